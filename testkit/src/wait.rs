//! Waiting for a condition with a deadline — the only way tests synchronise (never a bare sleep).

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every `every` until it returns `Some`, or panics after `deadline` with `what`.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let every = Duration::from_millis(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Blocking variant of [`until`] for code outside a runtime.
pub fn until_blocking<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
