//! Waiting for the server's drain and stop flags from inside a busy session.
//!
//! A session's `select!` polls every branch each time its task wakes, a dozen or more times
//! per message. A `watch` channel's wait takes the lock of the waiters' list that every
//! session shares at each of those polls, which on a busy proxy is most of what the wait
//! costs. [`FlagSet`] registers the wait once and afterwards looks only at the channel's
//! version, one atomic load, until the flag's channel changes or the task's waker does.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

/// Resolves when the watched flag is true, or when its sender is gone.
pub(crate) struct FlagSet {
    /// A receiver that never marks a value seen: it reports a change from the value at the
    /// start on, for good.
    probe: watch::Receiver<bool>,
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The waker the wait registered, while it waits.
    registered: Option<Waker>,
}

impl FlagSet {
    pub(crate) fn new(flag: &watch::Receiver<bool>) -> FlagSet {
        let mut receiver = flag.clone();
        FlagSet {
            probe: flag.clone(),
            // Outside the task's budget: a wait polled once the budget is spent would return
            // Pending without registering, and the shortcut in `poll` would then never
            // poll it again.
            wait: Box::pin(tokio::task::unconstrained(async move {
                // An error is a sender gone: the server is ending, as when the flag is set.
                let _ = receiver.wait_for(|set| *set).await;
            })),
            registered: None,
        }
    }
}

impl FlagSet {
    /// Whether the flag is set now, without waiting: the channel's version first (an atomic
    /// load), its value (a lock) only once the version moved.
    pub(crate) fn is_set(&self) -> bool {
        self.probe.has_changed().unwrap_or(true) && *self.probe.borrow()
    }
}

impl Future for FlagSet {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let unchanged = matches!(this.probe.has_changed(), Ok(false));
        let same_task = this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if unchanged && same_task {
            // The registered waker is this task's: a change will wake it.
            return Poll::Pending;
        }
        match this.wait.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                this.registered = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn resolves_at_once_when_already_set() {
        let (_tx, rx) = watch::channel(true);
        tokio::time::timeout(Duration::from_secs(1), FlagSet::new(&rx))
            .await
            .expect("a set flag resolves at once");
    }

    #[tokio::test]
    async fn wakes_a_waiting_task_when_set_and_not_before() {
        let (tx, rx) = watch::channel(false);
        let mut flag = FlagSet::new(&rx);
        assert!(!flag.is_set());
        // Polled many times while nothing changes, as in a busy session.
        for _ in 0..10 {
            assert!(
                tokio::time::timeout(Duration::from_millis(5), &mut flag)
                    .await
                    .is_err(),
                "resolved before the flag was set"
            );
        }
        // An unrelated change of value is no reason to resolve.
        tx.send(false).expect("receivers");
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut flag)
            .await
            .is_err());
        assert!(!flag.is_set(), "changed, but not set");
        let probe = FlagSet::new(&rx);
        let waiter = tokio::spawn(flag);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        tx.send(true).expect("receivers");
        assert!(probe.is_set());
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken when set")
            .expect("task");
    }

    /// A busy session can spend its task's budget before the flag's first poll.
    #[tokio::test]
    async fn a_wait_first_polled_with_the_task_budget_spent_is_still_woken() {
        let (tx, rx) = watch::channel(false);
        let (busy_tx, mut busy) = tokio::sync::mpsc::channel::<()>(1024);
        while busy_tx.try_send(()).is_ok() {}
        let mut flag = FlagSet::new(&rx);
        let waiter = tokio::spawn(async move {
            let mut spent = false;
            std::future::poll_fn(|cx| {
                if !spent {
                    // Taking messages until the budget says Pending.
                    while busy.poll_recv(cx).is_ready() {}
                    spent = true;
                }
                Pin::new(&mut flag).poll(cx)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "resolved before the flag was set");
        tx.send(true).expect("receivers");
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken when set")
            .expect("task");
        drop(busy_tx);
    }

    #[tokio::test]
    async fn resolves_when_the_sender_is_gone() {
        let (tx, rx) = watch::channel(false);
        let waiter = tokio::spawn(FlagSet::new(&rx));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken when the sender is gone")
            .expect("task");
    }
}
