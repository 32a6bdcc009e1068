//! Hot path: fairness between the tasks of a core.
//!
//! On the epoll driver a read of a socket with data waiting, and a write to one with room,
//! complete without waiting, so a loop relaying a stream that never lets up (a client
//! sending flat out to a backend reading as fast) never gives its core back: the core's
//! other connections, its accept loops and its table updates wait until the stream's
//! buffers happen to run empty or full. (io_uring does not have the gap: every operation
//! waits for its completion.) Such a loop counts what it moved in a [`Budget`] and, when
//! that is spent, [`yield_now`]s.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Bytes a relay moves between yields.
pub const YIELD_BYTES: usize = 1 << 20;

/// A count of bytes moved since the last yield; no allocation, a compare per call.
#[derive(Debug)]
pub struct Budget {
    left: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { left: YIELD_BYTES }
    }
}

impl Budget {
    /// Counts `n` bytes moved; true when [`YIELD_BYTES`] have been since the last time it
    /// said so (the budget starts again): the caller then awaits [`yield_now`].
    #[inline]
    pub fn spend(&mut self, n: usize) -> bool {
        match self.left.checked_sub(n) {
            Some(left) if left > 0 => {
                self.left = left;
                false
            }
            _ => {
                self.left = YIELD_BYTES;
                true
            }
        }
    }
}

/// The wakers of this thread's yielded tasks, woken by its waker task ([`Yields::run`]).
#[derive(Default)]
struct Yields {
    /// Tasks that yielded since the waker task last ran.
    waiting: Vec<Waker>,
    /// The waker task's, once started.
    waker: Option<Waker>,
    /// Whether the waker task was started on this thread.
    started: bool,
}

thread_local! {
    static YIELDS: RefCell<Yields> = RefCell::new(Yields::default());
}

/// Lets the core's other ready tasks run before the calling task goes on: it is woken
/// again behind them. (A task that wakes itself while it runs is put back at the *front*
/// of monoio's run queue, 0.2.4, so the usual self-wake yields to no other task: it runs
/// again at once, up to the loop's round limit, and again after.) A waker task, one per
/// thread and started at the first yield, wakes the yielded tasks: it runs in its turn,
/// behind the tasks that were ready when they yielded, and what it wakes goes to the back.
/// No allocation once the thread's list of yielded tasks has grown to the most that yield
/// at once.
///
/// For a thread that runs one monoio runtime for its life, as the workers of
/// [`crate::spawn_workers`] do: the waker task belongs to the runtime it was started on,
/// and a runtime that ends leaves it pending for good, so a task of a later runtime on the
/// same thread that yielded would never be woken.
pub fn yield_now() -> YieldNow {
    YieldNow { yielded: false }
}

/// See [`yield_now`].
#[derive(Debug)]
#[must_use = "a yield does nothing unless awaited"]
pub struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Polled again: woken by the waker task (or by something else meanwhile, which
        // ends the yield as well; the waker task's later wake is then a spurious one).
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        let start = YIELDS.with(|y| {
            let mut y = y.borrow_mut();
            y.waiting.push(cx.waker().clone());
            if let Some(w) = &y.waker {
                // Not running (this task is): queued at the back.
                w.wake_by_ref();
            }
            !std::mem::replace(&mut y.started, true)
        });
        if start {
            // Spawned tasks are queued at the back, and run there first.
            monoio::spawn(Yields::run());
        }
        Poll::Pending
    }
}

impl Yields {
    /// The waker task: each time it runs, wakes the tasks that yielded since (each goes to
    /// the back of the queue, as this task runs and they do not) and waits for the next.
    async fn run() {
        /// Dropped with the task (its runtime dropped it): the next yield starts another.
        struct Gone;
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = YIELDS.try_with(|y| {
                    let mut y = y.borrow_mut();
                    y.waker = None;
                    y.started = false;
                });
            }
        }
        let _gone = Gone;
        // Woken tasks, swapped with the list in turn (two lists: neither reallocates once
        // grown, and no yield can push to the one being woken).
        let mut woken: Vec<Waker> = Vec::new();
        std::future::poll_fn(|cx| {
            YIELDS.with(|y| {
                let mut y = y.borrow_mut();
                if !y.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    y.waker = Some(cx.waker().clone());
                }
                std::mem::swap(&mut y.waiting, &mut woken);
            });
            for w in woken.drain(..) {
                w.wake();
            }
            Poll::<()>::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn a_budget_says_yield_every_yield_bytes() {
        let mut b = Budget::default();
        let chunk = 16 * 1024;
        let per_yield = YIELD_BYTES / chunk;
        let said: Vec<usize> = (1..=3 * per_yield).filter(|_| b.spend(chunk)).collect();
        assert_eq!(said, [per_yield, 2 * per_yield, 3 * per_yield]);
        // One large amount at once counts as spent.
        assert!(Budget::default().spend(YIELD_BYTES + 1));
    }

    /// A task that yields runs again only after the tasks that were ready meanwhile (a
    /// self-wake would have run it again first, for ever: the other task never ran), on
    /// both drivers (each on a thread of its own, see [`yield_now`]).
    #[test]
    fn a_yield_goes_behind_the_ready_tasks() {
        fn round(epoll: bool) -> Option<(Vec<&'static str>, u32)> {
            let order = Rc::new(RefCell::new(Vec::new()));
            let run = {
                let order = order.clone();
                async move {
                    let spins = Rc::new(Cell::new(0u32));
                    // Spins, yielding each time, until the other task ran.
                    let spinner = {
                        let (order, spins) = (order.clone(), spins.clone());
                        monoio::spawn(async move {
                            while !order.borrow().contains(&"other") && spins.get() < 1000 {
                                spins.set(spins.get() + 1);
                                yield_now().await;
                            }
                            order.borrow_mut().push("spinner");
                        })
                    };
                    let other = {
                        let order = order.clone();
                        monoio::spawn(async move { order.borrow_mut().push("other") })
                    };
                    spinner.await;
                    other.await;
                    spins.get()
                }
            };
            let spins = if epoll {
                monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .build()
                    .unwrap()
                    .block_on(run)
            } else if monoio::utils::detect_uring() {
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .build()
                    .unwrap()
                    .block_on(run)
            } else {
                return None;
            };
            let order = order.borrow().clone();
            Some((order, spins))
        }
        for epoll in [true, false] {
            let Some((order, spins)) = std::thread::spawn(move || round(epoll)).join().unwrap()
            else {
                continue;
            };
            assert_eq!(order, ["other", "spinner"], "epoll: {epoll}");
            assert_eq!(spins, 1, "epoll: {epoll}: spun before the other task ran");
        }
    }
}
