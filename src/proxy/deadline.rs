//! One timer for the successive waits of a keep-alive connection (for the next request, for
//! a response), moved lazily: a wait that ends later than the timer only records its
//! deadline, and the timer, when it fires early, moves itself on to it. A busy connection
//! thus touches tokio's timer wheel about once per shortest timeout instead of twice per
//! request.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Where the timer rests before its first deadline.
const FAR: Duration = Duration::from_secs(86_400 * 365);

/// A deadline that can be set again and again without a timer of its own each time.
pub(crate) struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Option<Instant>,
}

impl Default for Deadline {
    fn default() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now() + FAR)),
            at: None,
        }
    }
}

impl Deadline {
    /// The wait from now on ends at `at` (`None`: never).
    pub(crate) fn set(&mut self, at: Option<Instant>) {
        self.at = at;
        if let Some(at) = at
            && at < self.sleep.deadline()
        {
            self.sleep.as_mut().reset(at);
        }
    }

    /// [`Deadline::set`] to `after` from now.
    pub(crate) fn set_after(&mut self, after: Option<Duration>) {
        self.set(after.map(|d| Instant::now() + d));
    }

    /// The deadline set (`None`: none).
    pub(crate) fn at(&self) -> Option<Instant> {
        self.at
    }

    /// Resolves once the deadline set has passed; never while none is.
    pub(crate) fn elapsed(&mut self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| self.poll_elapsed(cx))
    }

    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(at) = self.at else {
                return Poll::Pending;
            };
            ready!(self.sleep.as_mut().poll(cx));
            if self.sleep.deadline() >= at {
                return Poll::Ready(());
            }
            // Fired for an earlier wait: on to this one's deadline.
            self.sleep.as_mut().reset(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `d` has elapsed, polled once.
    fn elapsed_now(d: &mut Deadline) -> bool {
        let waker = std::task::Waker::noop();
        d.poll_elapsed(&mut Context::from_waker(waker)).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn each_wait_ends_at_its_own_deadline() {
        let mut d = Deadline::default();
        assert!(!elapsed_now(&mut d), "no deadline, no end");
        let start = Instant::now();
        // A short wait, then longer ones: the timer first fires for the short one.
        d.set_after(Some(Duration::from_secs(30)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!elapsed_now(&mut d));
        d.set_after(Some(Duration::from_secs(300)));
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(
            !elapsed_now(&mut d),
            "fired at 30 s for the first wait only"
        );
        d.elapsed().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(310));
        // A later wait ending before the timer: the timer is brought forward.
        d.set_after(Some(Duration::from_secs(600)));
        assert!(!elapsed_now(&mut d));
        d.set_after(Some(Duration::from_secs(5)));
        let before = Instant::now();
        d.elapsed().await;
        assert_eq!(Instant::now() - before, Duration::from_secs(5));
        // None: never, however long.
        d.set(None);
        let never = tokio::time::timeout(Duration::from_secs(86_400), d.elapsed()).await;
        assert!(never.is_err());
        // A deadline already past has elapsed at once.
        d.set(Some(Instant::now()));
        assert!(elapsed_now(&mut d));
    }
}
