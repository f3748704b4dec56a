//! Log output for every command (README "Logs"): text or JSON lines on stderr, with the
//! filter from `--log-level` (or `HOLDFAST_LOG`). Under journald (`JOURNAL_STREAM`
//! names our stderr) text lines start with a syslog priority (`<3>` for errors) and
//! carry no timestamp, since the journal adds its own, so `journalctl -p err` works.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

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

/// Parses a filter: comma-separated `target=level` directives and at most one bare
/// level for everything else (`info,openraft=warn`). This is tracing-subscriber's
/// `Targets` filter rather than its `EnvFilter`: the same directives without span and
/// field matching, and without the regex engine that matching needs, which kept 0.8 MiB
/// out of the binary (ARCHITECTURE.md, "Decisions").
pub fn parse_filter(directives: &str) -> Result<Targets, String> {
    directives.parse::<Targets>().map_err(|e| e.to_string())
}

/// Installs the global subscriber. `level` is a filter directive; an invalid one is a
/// configuration error, returned as its message. Without one, `HOLDFAST_LOG` is used
/// when it parses, else [`DEFAULT_FILTER`].
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = match level {
        Some(l) => parse_filter(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => std::env::var("HOLDFAST_LOG")
            .ok()
            .and_then(|v| parse_filter(&v).ok())
            .unwrap_or_else(|| parse_filter(DEFAULT_FILTER).expect("the default filter parses")),
    };
    let base = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Json => base.json().with_current_span(false).with_span_list(false).boxed(),
        LogFormat::Text if stderr_is_journal() => base
            .with_ansi(false)
            .event_format(Journald(tracing_subscriber::fmt::format().without_time().with_ansi(false)))
            .boxed(),
        // Container logs are files, not terminals: no colour codes in them.
        LogFormat::Text => base.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_take_target_directives_and_refuse_nonsense() {
        let f = parse_filter(DEFAULT_FILTER).unwrap();
        assert!(f.would_enable("holdfast::node", &Level::INFO));
        assert!(!f.would_enable("holdfast::node", &Level::DEBUG));
        assert!(f.would_enable("openraft::core", &Level::WARN));
        assert!(!f.would_enable("openraft::core", &Level::INFO));
        let f = parse_filter("warn,holdfast::manager=debug").unwrap();
        assert!(f.would_enable("holdfast::manager::leader", &Level::DEBUG));
        assert!(!f.would_enable("holdfast::worker", &Level::INFO));
        for bad in ["info,==", "holdfast=loud", "a=b=c"] {
            assert!(parse_filter(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
