//! `holdfast guard`: the first process (PID 1) of every guarded container (offline mode
//! `exclusive`, or `offline.guard: true`). It runs the image's own ENTRYPOINT + CMD as
//! its one child, forwards signals to it, reaps every zombie, passes the child's exit
//! code through, and keeps a **deadline**: when the deadline passes, it stops the child
//! (SIGTERM, then SIGKILL after a short grace) and exits with [`FENCED_EXIT`]. See
//! ARCHITECTURE.md ("The fence inside the container").
//!
//! The deadline channel is a small file the worker writes into the container through
//! the engine (`docker cp`) on every lease renewal, holding an absolute
//! `CLOCK_BOOTTIME` deadline the worker derived from its own lease. The guard re-reads
//! it every [`POLL`]. Because the deadline is absolute, a write that reaches the
//! container late can only carry an older (earlier) deadline, never one past the lease;
//! and because the guard counts down by itself, the deadline passes whether or not the
//! worker is alive.
//!
//! Written with `libc` directly, like tini: PID 1 must block every signal before any
//! thread exists and wait for them with `sigtimedwait`, which neither `nix` nor
//! `signal-hook` (a handler thread and a self-pipe) offers. No tokio runtime is
//! started, so the guard stays a single small thread.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code of a guard that stopped its task because the deadline passed. Chosen
/// outside the shell's (126-128+) and sysexits' (64-78) ranges.
pub const FENCED_EXIT: i32 = 213;
/// Exit code when the app could not be found (as in a shell).
pub const NOT_FOUND_EXIT: i32 = 127;
/// Exit code when the app exists but could not be executed (as in a shell).
pub const CANNOT_EXEC_EXIT: i32 = 126;
/// Where the guard binary lives inside a guarded container (a read-only volume).
pub const GUARD_DIR: &str = "/.holdfast";
/// The guard binary inside a guarded container.
pub const GUARD_BIN: &str = "/.holdfast/holdfast";
/// The deadline file the worker writes into a guarded container (directory, name).
pub const DEADLINE_DIR: &str = "/";
/// File name of the deadline, in [`DEADLINE_DIR`].
pub const DEADLINE_NAME: &str = ".holdfast-deadline";
/// How often the guard re-reads the deadline file.
pub const POLL: Duration = Duration::from_millis(200);

/// Settings of one guard process.
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// The app: program and arguments (ENTRYPOINT + CMD).
    pub argv: Vec<OsString>,
    /// The deadline file.
    pub deadline_file: PathBuf,
}

/// `CLOCK_BOOTTIME` in ms: monotonic, counts suspend, shared by every process of the
/// kernel (Docker uses no time namespaces), so a worker and the guards in its engine's
/// containers read the same clock, unaffected by wall-clock steps.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux ≥ 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000) + (ts.tv_nsec as u64) / 1_000_000
}

/// A deadline as the worker writes it and the guard reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// When the guard starts stopping the app, `CLOCK_BOOTTIME` ms.
    pub at_boot_ms: u64,
    /// SIGTERM → SIGKILL grace, ms.
    pub grace_ms: u64,
}

impl Deadline {
    /// The file's text. The trailing newline marks a complete write: a torn read is
    /// ignored, never misread.
    pub fn text(&self) -> String {
        format!("holdfast-deadline-v1 {} {}\n", self.at_boot_ms, self.grace_ms)
    }

    /// Parses [`Deadline::text`]; `None` for anything else (absent, torn, foreign).
    pub fn parse(text: &str) -> Option<Deadline> {
        let line = text.strip_suffix('\n')?;
        let (at, grace) = line.strip_prefix("holdfast-deadline-v1 ")?.split_once(' ')?;
        Some(Deadline { at_boot_ms: at.parse().ok()?, grace_ms: grace.parse().ok()? })
    }
}

fn read_deadline(path: &Path) -> Option<Deadline> {
    std::fs::read_to_string(path).ok().as_deref().and_then(Deadline::parse)
}

/// Signals the guard forwards to the app unchanged.
const FORWARDED: [libc::c_int; 9] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGALRM,
    libc::SIGCONT,
];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write into the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

fn say(message: &str) {
    // The app's logs are the container's logs; the guard speaks only when it acts.
    eprintln!("holdfast guard: {message}");
}

/// Exit code of a wait status: the app's code, or 128 + signal like a shell.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Runs the guard to completion and returns the process exit code. Must be called
/// before any other thread exists (the signal mask is per thread and inherited).
pub fn run(config: GuardConfig) -> i32 {
    let Some(program) = config.argv.first().cloned() else {
        say("nothing to run: the image has no ENTRYPOINT or CMD and the task gave no command");
        return NOT_FOUND_EXIT;
    };
    let set = signal_set();
    block_signals(&set);
    let Some(deadline) = first_deadline(&config.deadline_file) else {
        say("no deadline written: not starting the task");
        return FENCED_EXIT;
    };
    if boottime_ms() >= deadline.at_boot_ms {
        say("the deadline has passed (lease expired): not starting the task");
        return FENCED_EXIT;
    }
    match spawn_app(&program, &config.argv[1..]) {
        Ok(app) => supervise(app, deadline, &set, &config.deadline_file),
        Err(code) => code,
    }
}

/// Blocks the signals of `set` on this (the only) thread, and makes the guard the
/// reaper of the app's orphans outside a container.
fn block_signals(set: &libc::sigset_t) {
    // SAFETY: blocking signals on the only thread; they stay pending for sigtimedwait.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut());
        if libc::getpid() != 1 {
            // Outside a container (tests), orphans of the app still come to us to reap.
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }
}

/// The deadline to start with. A renewal may be rewriting the file just now (the
/// engine truncates, then writes): a torn read is retried briefly before it counts as
/// no deadline at all.
fn first_deadline(file: &Path) -> Option<Deadline> {
    (0..10).find_map(|attempt| {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        read_deadline(file)
    })
}

/// Starts the app; its pid, or the exit code the guard ends with when it cannot.
fn spawn_app(program: &OsString, args: &[OsString]) -> Result<libc::pid_t, i32> {
    let mut command = std::process::Command::new(program);
    command.args(args);
    // The app must start with an empty signal mask, as it would as PID 1 of a plain
    // container: std does not reset the mask it inherits. Stdio is inherited.
    // SAFETY: the closure only calls sigemptyset and pthread_sigmask, both
    // async-signal-safe, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            say(&format!("cannot run {}: {e}", program.to_string_lossy()));
            return Err(if e.kind() == std::io::ErrorKind::NotFound { NOT_FOUND_EXIT } else { CANNOT_EXEC_EXIT });
        }
    };
    let app = child.id() as libc::pid_t;
    // The child is reaped by waitpid(-1) in `supervise`, never through `child`.
    drop(child);
    Ok(app)
}

/// Runs alongside the app until it exits: follows renewals of the deadline in
/// `deadline_file`, stops the app (SIGTERM, then SIGKILL after the grace) once the
/// deadline passes, forwards the signals of `set`, reaps orphans. The app's exit code,
/// or [`FENCED_EXIT`] when the guard stopped it.
fn supervise(app: libc::pid_t, mut deadline: Deadline, set: &libc::sigset_t, deadline_file: &Path) -> i32 {
    let mut next_poll = boottime_ms() + POLL.as_millis() as u64;
    let mut kill_at: Option<u64> = None;
    let mut killed = false;
    loop {
        let now = boottime_ms();
        match kill_at {
            None if now >= deadline.at_boot_ms => {
                say(&format!(
                    "lease deadline passed: stopping the task (SIGTERM, SIGKILL after {} ms); exit code {FENCED_EXIT}",
                    deadline.grace_ms
                ));
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(app, libc::SIGTERM) };
                kill_at = Some(now + deadline.grace_ms);
            }
            Some(at) if now >= at && !killed => {
                // SAFETY: as above.
                unsafe { libc::kill(app, libc::SIGKILL) };
                killed = true;
            }
            _ => {}
        }
        if now >= next_poll {
            if kill_at.is_none() {
                if let Some(d) = read_deadline(deadline_file) {
                    deadline = d;
                }
            }
            next_poll = now + POLL.as_millis() as u64;
        }
        let mut wake = next_poll;
        match kill_at {
            None => wake = wake.min(deadline.at_boot_ms),
            Some(at) if !killed => wake = wake.min(at),
            Some(_) => {}
        }
        let wait_ms = wake.saturating_sub(boottime_ms()).max(1);
        let timeout =
            libc::timespec { tv_sec: (wait_ms / 1_000) as libc::time_t, tv_nsec: ((wait_ms % 1_000) * 1_000_000) as _ };
        // SAFETY: `set` and `timeout` are valid; the siginfo out-pointer may be null.
        let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
        if signal == libc::SIGCHLD {
            if let Some(status) = reap(app) {
                return if kill_at.is_some() { FENCED_EXIT } else { exit_code(status) };
            }
        } else if signal > 0 {
            // SAFETY: forwarding a signal to our own child.
            unsafe { libc::kill(app, signal) };
        }
        // -1: timeout (EAGAIN) or EINTR; the loop re-checks the clock either way.
    }
}

/// Reaps every exited child; returns the app's wait status if it was among them.
fn reap(app: libc::pid_t) -> Option<libc::c_int> {
    let mut app_status = None;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into our local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return app_status;
        }
        if pid == app {
            app_status = Some(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_text_round_trips_and_torn_writes_are_ignored() {
        let d = Deadline { at_boot_ms: 123_456, grace_ms: 2_000 };
        let text = d.text();
        assert_eq!(Deadline::parse(&text), Some(d));
        // Every proper prefix of a write is rejected, so a torn read never shortens or
        // lengthens the deadline.
        for cut in 0..text.len() {
            assert_eq!(Deadline::parse(&text[..cut]), None, "{:?}", &text[..cut]);
        }
        assert_eq!(Deadline::parse("holdfast-deadline-v1 x 1\n"), None);
        assert_eq!(Deadline::parse("holdfast-deadline-v1 1\n"), None);
        assert_eq!(Deadline::parse("999 1\n"), None);
    }

    #[test]
    fn wait_status_maps_to_shell_exit_codes() {
        // Encoded as Linux does: exit code in bits 8..16, signal in the low 7 bits.
        assert_eq!(exit_code(7 << 8), 7);
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(libc::SIGKILL), 128 + 9);
        assert_eq!(exit_code(libc::SIGTERM), 128 + 15);
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_ms();
        assert!(a > 0);
        assert!(boottime_ms() >= a);
    }
}
