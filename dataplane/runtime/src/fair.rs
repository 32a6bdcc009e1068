//! Hot path: fairness between the tasks of a core.
//!
//! On the epoll driver a read of a socket with data waiting, and a write to one with room,
//! complete without waiting, so a loop relaying a stream that never lets up (a client
//! sending flat out to a backend reading as fast) never gives its core back: the core's
//! other connections, its accept loops and its table updates wait until the stream's
//! buffers happen to run empty or full. (io_uring does not have the gap: every operation
//! waits for its completion.) Such a loop counts what it moved in a [`Budget`] and, when
//! that is spent, [`yield_now`]s.
//!
//! What that bounds, on a core carrying such streams: a task that is ready (its I/O event
//! was seen, another thread woke it) runs within one round, each yielding loop moving at
//! most [`YIELD_BYTES`] in it, as the driver is polled without waiting between rounds
//! (monoio's `submit`); a timer (a sleep, a timeout) fires at most [`PARK_EVERY`] plus a
//! round late, as the waker task lets the driver park, which is where monoio fires timers,
//! that often (see [`yield_now`]).
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use monoio::time::Instant;

/// Bytes a relay moves between yields.
pub const YIELD_BYTES: usize = 1 << 20;

/// How long yielding tasks may keep the core's run queue from emptying before the waker
/// task lets the driver park, so that timers fire (see [`yield_now`]). A pause costs one
/// driver poll without waiting and a timer-wheel pass, no wait: at 10 ms, a task spinning
/// through yields on the epoll driver lost under 1 % of its iterations (within noise), and
/// a timer is late by at most 10 ms and a round. (Pausing on a 1 ms sleep would wait 1-2
/// ms, monoio rounding deadlines up to the next millisecond: 18 % at 10 ms.)
pub const PARK_EVERY: Duration = Duration::from_millis(10);

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
    /// Counts [`reset`]s: a waker task that ends clears the state only if none came since
    /// it started (it would be a later runtime's).
    generation: u64,
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
/// Timers: a yielding task and the waker task keep handing the core to each other, so the
/// run queue never empties, and monoio 0.2.4 (`Runtime::block_on`) parks its driver, the
/// only place it fires timers, only when it is empty (otherwise it polls the driver for
/// I/O without waiting, `submit`, which fires none). So once [`PARK_EVERY`] has passed
/// since it last did, the waker task, before waking its list, awaits a timer already due:
/// all yielded tasks and the waker task are then pending, the queue empties once the ready
/// tasks ran, the driver parks without waiting (a timer is due) and fires every due timer,
/// the waker task's among them. The timer's deadline is a millisecond in the past, so it
/// costs no wait: monoio checks a new timer against the time of its last firing pass,
/// which is older while the core is kept busy, and arms it; if a pass ran in the same
/// millisecond (the queue emptied by itself), the timer is ready at once and there is
/// nothing to catch up on. Needs a runtime with timers enabled (`enable_timer`, as
/// [`crate::spawn_workers`] builds them): without, the waker task panics at its first
/// pause.
///
/// One waker task per thread, for the runtime it was started on: monoio 0.2.4 keeps no
/// list of a runtime's tasks, so one that ends neither drops nor runs it (the waker it
/// keeps in this thread's state keeps it alive until the thread ends, and its end-of-task
/// cleanup never runs before). A later runtime on the same thread finds it started: a
/// yield there wakes it, and the thread's current runtime runs it, unless it was queued
/// when its runtime ended: it then stays marked queued, a wake does nothing, and the
/// yielded task is never woken (`reset_lets_a_later_runtime_on_the_thread_yield`). A
/// thread that runs several monoio runtimes calls [`reset`] between them.
pub fn yield_now() -> YieldNow {
    YieldNow { yielded: false }
}

/// Forgets this thread's waker task and yielded tasks, for a thread that ends one monoio
/// runtime and builds another (see [`yield_now`]): the next yield starts a waker task on
/// the runtime then current. Call it between runtimes, not while one runs.
pub fn reset() {
    let old = YIELDS.with(|y| {
        let mut y = y.borrow_mut();
        y.generation += 1;
        y.started = false;
        (y.waker.take(), std::mem::take(&mut y.waiting))
    });
    // Dropped with the state released: the last reference to a task drops its future.
    drop(old);
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
    /// the back of the queue, as this task runs and they do not) and waits for the next;
    /// first, every [`PARK_EVERY`], it lets the driver park (see [`yield_now`]).
    async fn run() {
        /// Dropped with the task, which happens only when this thread's state lets go of
        /// it (the thread ends, [`reset`]): the next yield starts another, if still ours.
        struct Gone(u64);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = YIELDS.try_with(|y| {
                    if let Ok(mut y) = y.try_borrow_mut() {
                        if y.generation == self.0 {
                            y.waker = None;
                            y.started = false;
                        }
                    }
                });
            }
        }
        let _gone = Gone(YIELDS.with(|y| y.borrow().generation));
        // Woken tasks, swapped with the list in turn (two lists: neither reallocates once
        // grown, and no yield can push to the one being woken).
        let mut woken: Vec<Waker> = Vec::new();
        let mut parked = Instant::now();
        loop {
            let now = Instant::now();
            if now.saturating_duration_since(parked) >= PARK_EVERY {
                // Due already (a millisecond back, as monoio rounds deadlines up to the
                // next): armed if no timer pass ran this millisecond, else ready at once.
                monoio::time::sleep_until(now.checked_sub(Duration::from_millis(1)).unwrap_or(now))
                    .await;
                parked = Instant::now();
            }
            let mut waited = false;
            std::future::poll_fn(|cx| {
                if std::mem::replace(&mut waited, true) {
                    return Poll::Ready(());
                }
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
                Poll::Pending
            })
            .await;
        }
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
                    .enable_timer()
                    .build()
                    .unwrap()
                    .block_on(run)
            } else if monoio::utils::detect_uring() {
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .enable_timer()
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

    fn epoll() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    /// A task spinning through [`Budget`] and [`yield_now`] without ever waiting, as a relay
    /// of a saturating stream does on the epoll driver, until `stop` is set or `limit` has
    /// passed; returns its iterations.
    async fn spin(stop: Rc<Cell<bool>>, limit: Duration) -> u64 {
        let start = std::time::Instant::now();
        let mut budget = Budget::default();
        let mut n = 0u64;
        while !stop.get() && start.elapsed() < limit {
            n += 1;
            if budget.spend(64 * 1024) {
                yield_now().await;
            }
        }
        n
    }

    /// A timer of another task fires while a task of the core spins through yields (the
    /// spinner and the waker task keep the run queue from emptying: without the waker
    /// task's pauses the driver never parks and the timer waits for the spinner to stop).
    #[test]
    fn timers_fire_while_a_task_spins_through_yields() {
        std::thread::spawn(|| {
            epoll().block_on(async {
                let stop = Rc::new(Cell::new(false));
                let spinner = monoio::spawn(spin(stop.clone(), Duration::from_secs(3)));
                let start = std::time::Instant::now();
                let timer = monoio::spawn(async move {
                    monoio::time::sleep(Duration::from_millis(50)).await;
                    let fired = start.elapsed();
                    stop.set(true);
                    fired
                });
                let fired = timer.await;
                spinner.await;
                assert!(
                    fired < Duration::from_millis(500),
                    "a 50 ms sleep fired after {fired:?}"
                );
            })
        })
        .join()
        .unwrap();
    }

    /// A thread that ends a runtime whose waker task was queued (a task yielding for ever
    /// and the waker task keep handing the core to each other; the runtime ends between
    /// two) and builds another yields there after [`reset`] (without it, the yield would
    /// never be woken: the waker task stays notified, so not queued again, and no runtime
    /// runs it).
    #[test]
    fn reset_lets_a_later_runtime_on_the_thread_yield() {
        for k in 1..=4 {
            let done = std::thread::spawn(move || {
                epoll().block_on(async move {
                    let _spinner = monoio::spawn(async {
                        loop {
                            yield_now().await;
                        }
                    });
                    for _ in 0..k {
                        yield_now().await;
                    }
                });
                reset();
                epoll().block_on(async {
                    monoio::select! {
                        _ = yield_now() => true,
                        _ = monoio::time::sleep(Duration::from_millis(500)) => false,
                    }
                })
            })
            .join()
            .unwrap();
            assert!(done, "{k}: a yield on the second runtime was never woken");
        }
    }

    /// Iterations per second of a spinner through yields, with the waker task's pauses
    /// (run with `--ignored --nocapture`; compare with [`PARK_EVERY`] set very high).
    #[test]
    #[ignore]
    fn spin_rate() {
        let n = std::thread::spawn(|| {
            epoll().block_on(spin(Rc::new(Cell::new(false)), Duration::from_secs(3)))
        })
        .join()
        .unwrap();
        println!("spin rate: {:.1} M iterations/s", n as f64 / 3e6);
    }
}
