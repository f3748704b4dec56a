//! Log output for every command (README "Logs"): text or JSON lines on stderr, with the
//! filter from `--log-level` (or `HOLDFAST_LOG`). Under journald (`JOURNAL_STREAM`
//! names our stderr) text lines start with a syslog priority (`<3>` for errors) and
//! carry no timestamp, since the journal adds its own, so `journalctl -p err` works.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The filter used when neither `--log-level` nor `HOLDFAST_LOG` says otherwise.
pub const DEFAULT_FILTER: &str = "info,openraft=warn";

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM` is
/// `device:inode` of that stream; a child that inherited the variable but writes
/// elsewhere must not use the journal format).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.split_once(':') else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Syslog priority of a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Prefixes each line with `<priority>` for journald's stream parser.
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the global subscriber. `level` is a filter directive; an invalid one is a
/// configuration error, returned as its message.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_env("HOLDFAST_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER)),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().with_current_span(false).with_span_list(false).try_init(),
        LogFormat::Text if stderr_is_journal() => builder
            .with_ansi(false)
            .event_format(Journald(tracing_subscriber::fmt::format().without_time().with_ansi(false)))
            .try_init(),
        // Container logs are files, not terminals: no colour codes in them.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}
