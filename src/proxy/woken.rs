//! [`Woken`]: a future that a task waits on beside others for a long time (a lease lost, the
//! daemon draining), polled again only after it woke. `select!` polls every branch each
//! time the task wakes, and a cancellation wait takes two locks per poll; a keep-alive
//! connection wakes twice per request. Behind `Woken` such a poll is an atomic swap and a
//! waker check.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// Wraps a future so that it is polled only when it asked to be (see the module).
pub(crate) struct Woken<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    /// The waker the inner future registers: it raises the flag and wakes the task.
    waker: Waker,
}

/// Raised by the inner future's wake-ups; holds the task to wake.
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Woken<F> {
    pub(crate) fn new(inner: F) -> Self {
        let flag = Arc::new(Flag {
            // The first poll always reaches the inner future.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            inner: Box::pin(inner),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for Woken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // The task first, then the flag: a wake-up in between still wakes this task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio_util::sync::CancellationToken;

    /// A cancellation wait that counts its polls.
    struct Counted {
        polls: Arc<AtomicUsize>,
        wait: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.wait.as_mut().poll(cx)
        }
    }

    #[tokio::test]
    async fn polls_the_inner_future_only_after_it_woke() {
        let token = CancellationToken::new();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut woken = Woken::new(Counted {
            polls: polls.clone(),
            wait: Box::pin(token.clone().cancelled_owned()),
        });
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        for _ in 0..5 {
            assert!(Pin::new(&mut woken).poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "polled once, then left alone"
        );
        // Cancelled from another task: the waiting task wakes and the wait completes.
        let cancel = tokio::spawn(async move { token.cancel() });
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut woken)
            .await
            .expect("woken by the cancellation");
        cancel.await.unwrap();
        assert!(polls.load(Ordering::Relaxed) >= 2);
    }
}
