//! A panic while serving a request is a bug, but it must not hide what was done: the request
//! may already have reached its origin (with a token, or an approved body). So the gateway
//! catches it where a request is served — around its own pipeline and send path (`proxy`),
//! and around each HTTP/1 request pingora serves on a connection (`head`) — and ends the
//! request as any other failure: a `502 internal_error` to the sandbox when nothing of the
//! answer was written yet, a log line with the panic's message, the request's audit record,
//! and the counter `tollgate_panics_total`.
//!
//! With the `fault-injection` feature (test builds only: the end-to-end tests enable it; a
//! release build has no such code), and only when the gateway runs with
//! `TOLLGATE_FAULT_INJECTION=1` (so that a binary `cargo test` or `cargo bench` built with
//! the feature is still inert), a request to a path under `FAULT_PATH` panics at the named
//! place, so that the tests can check all of the above.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use crate::reply::{ErrorCode, Refusal};

/// Panics caught since start.
static CAUGHT: AtomicU64 = AtomicU64::new(0);

/// How many panics were caught while serving requests, since start.
pub fn caught() -> u64 {
    CAUGHT.load(Ordering::Relaxed)
}

/// The answer to a request whose serving panicked.
pub fn refusal() -> Refusal {
    Refusal::new(
        ErrorCode::InternalError,
        "the gateway failed while serving this request (a bug; it is logged and counted); the \
         request may have reached its origin",
    )
    .with_status(502)
}

/// Runs `serving` to its end; `Err(())` if it panicked (counted and logged as `what`).
///
/// A plain future that holds `serving` itself, not an `async fn`: an `async fn` keeps its
/// argument and the pinned copy it polls side by side, so every request's pipeline state
/// would be stored (and copied into its box) twice.
pub fn catching<F: Future>(what: &'static str, serving: F) -> CatchUnwind<F> {
    CatchUnwind { serving, what }
}

pin_project_lite::pin_project! {
    /// The future [`catching`] returns.
    pub struct CatchUnwind<F> {
        #[pin]
        serving: F,
        what: &'static str,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let what = *this.what;
        let serving = this.serving;
        // Nothing of the future's state is used again after a panic: it is dropped.
        match catch_unwind(AssertUnwindSafe(|| serving.poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                CAUGHT.fetch_add(1, Ordering::Relaxed);
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                tracing::error!(serving = what, panic = %message, "panic while serving a request; answered 502");
                Poll::Ready(Err(()))
            }
        }
    }
}

/// Where injected faults are asked for: `FAULT_PATH` + the place, e.g.
/// `/__tollgate_fault/panic/send`.
#[cfg(feature = "fault-injection")]
pub const FAULT_PATH: &str = "/__tollgate_fault/panic/";

/// Whether faults are injected: a fault-injection build run with `TOLLGATE_FAULT_INJECTION=1`.
#[cfg(feature = "fault-injection")]
pub fn armed() -> bool {
    static ARMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ARMED.get_or_init(|| std::env::var_os("TOLLGATE_FAULT_INJECTION").is_some_and(|v| v == "1"))
}

/// Whether faults are injected: never, in this build.
#[cfg(not(feature = "fault-injection"))]
pub fn armed() -> bool {
    false
}

/// Panics if `path` asks for a panic at `place` (armed fault-injection builds only).
#[cfg(feature = "fault-injection")]
pub fn inject(path: &str, place: &str) {
    if armed() && path.strip_prefix(FAULT_PATH) == Some(place) {
        panic!("fault injected: a panic in {place}");
    }
}

/// Does nothing: this build has no fault injection.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn inject(_path: &str, _place: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_caught_counted_and_the_rest_runs_on() {
        let before = caught();
        assert_eq!(catching("test", async { 7 }).await, Ok(7));
        let panicked = catching("test", async {
            tokio::task::yield_now().await;
            panic!("boom")
        })
        .await;
        assert_eq!(panicked, Err::<(), ()>(()));
        assert_eq!(caught(), before + 1);
    }
}
