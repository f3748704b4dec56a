//! Benchmark (not a test): what the resilience wrapper costs.
//!
//! - overhead of `Guard::run` (bulkhead + breaker + timeout) around a no-op async call
//!   with the breaker closed, against the bare call: mean ns/call over a batch, p50/p99
//!   of individually timed calls (each includes ~20–40 ns of clock reads, the same for
//!   both), and the ratio;
//! - the same with the breaker alone, the bulkhead alone and the timeout alone, to see
//!   where the cost is;
//! - fail-fast latency with the breaker open (p50/p99/max): what a caller waits for a
//!   "dependency down" answer.
//!
//! Run: `cargo bench --bench resilience` (env `BENCH_CALLS`, default 200,000).

use std::hint::black_box;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use holdfast::resilience::{BreakerConfig, BulkheadConfig, Guard, GuardError, Registry};

async fn noop(x: u64) -> Result<u64, ()> {
    Ok(black_box(x))
}

struct Figures {
    mean_ns: f64,
    p50_ns: u64,
    p99_ns: u64,
    max_ns: u64,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Times `calls` awaits of `f`: once as a batch (mean), once call by call (percentiles).
async fn measure<F, Fut>(calls: usize, mut f: F) -> Figures
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for i in 0..(calls / 10) as u64 {
        black_box(f(i).await);
    }
    let start = Instant::now();
    for i in 0..calls as u64 {
        black_box(f(i).await);
    }
    let mean_ns = start.elapsed().as_nanos() as f64 / calls as f64;
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls as u64 {
        let t = Instant::now();
        black_box(f(i).await);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    Figures { mean_ns, p50_ns: pct(&samples, 0.50), p99_ns: pct(&samples, 0.99), max_ns: pct(&samples, 1.0) }
}

fn row(name: &str, f: &Figures, bare: Option<&Figures>) {
    let ratio = bare.map(|b| format!("{:>6.1}x", f.mean_ns / b.mean_ns)).unwrap_or_else(|| "      -".into());
    println!("{name:<44} {:>9.1} {:>9} {:>9} {:>10} {ratio}", f.mean_ns, f.p50_ns, f.p99_ns, f.max_ns);
}

fn main() {
    let calls: usize = std::env::var("BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build a tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let reg = Registry::new();
        let closed = Guard::new(
            reg.breaker("closed", BreakerConfig::default()),
            reg.bulkhead("closed.op", BulkheadConfig::fail_fast(NonZeroUsize::new(1024).expect("nonzero"))),
            Duration::from_secs(1),
        );
        let open = Guard::new(
            reg.breaker(
                "open",
                BreakerConfig {
                    failure_threshold: NonZeroU32::MIN,
                    success_threshold: NonZeroU32::MIN,
                    open_for: Duration::from_secs(3_600),
                },
            ),
            reg.bulkhead("open.op", BulkheadConfig::fail_fast(NonZeroUsize::new(1024).expect("nonzero"))),
            Duration::from_secs(1),
        );
        let _ = open.run("open", async { Err::<(), _>(()) }).await;

        println!("resilience overhead, {calls} calls per case, current-thread tokio runtime, release build");
        println!("{:<44} {:>9} {:>9} {:>9} {:>10} {:>7}", "case", "mean ns", "p50 ns", "p99 ns", "max ns", "ratio");
        let bare = measure(calls, |i| async move { noop(i).await.is_ok() }).await;
        row("bare no-op call", &bare, None);
        let full = measure(calls, |i| {
            let g = &closed;
            async move { g.run("noop", noop(i)).await.is_ok() }
        })
        .await;
        row("guard: bulkhead+breaker+timeout (closed)", &full, Some(&bare));
        let b = &closed.breaker;
        let breaker = measure(calls, |i| async move { b.call(|| noop(i)).await.is_ok() }).await;
        row("breaker alone (closed)", &breaker, Some(&bare));
        let h = &closed.bulkhead;
        let bulkhead = measure(calls, |i| async move { h.run(noop(i)).await.is_ok() }).await;
        row("bulkhead alone", &bulkhead, Some(&bare));
        let timeout = measure(calls, |i| async move {
            holdfast::resilience::with_timeout(Duration::from_secs(1), "noop", noop(i)).await.is_ok()
        })
        .await;
        row("timeout alone", &timeout, Some(&bare));
        let fail_fast = measure(calls, |i| {
            let g = &open;
            async move { matches!(g.run("noop", noop(i)).await, Err(GuardError::Open { .. })) }
        })
        .await;
        row("guard with breaker OPEN (fail fast)", &fail_fast, Some(&bare));
        println!();
        println!(
            "closed-guard overhead: {:.1} ns/call over the bare call (mean); p99 {} ns vs {} ns",
            full.mean_ns - bare.mean_ns,
            full.p99_ns,
            bare.p99_ns
        );
        println!(
            "open-breaker fail-fast: p50 {} ns, p99 {} ns ({:.4} ms; target < 1 ms)",
            fail_fast.p50_ns,
            fail_fast.p99_ns,
            fail_fast.p99_ns as f64 / 1e6
        );
        let snap = reg.snapshot();
        let rejected = snap.breakers.iter().find(|b| b.name == "open").map_or(0, |b| b.rejected_total);
        println!("open breaker rejected {rejected} calls; none ran");
    });
}
