//! Per-thread recycled heap slots for futures: a connection's per-request state machine
//! lives in a slot taken from a free list and given back when it completes, so an idle
//! connection holds only a small future and a busy one does not allocate per request.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Free slots kept per size class per thread.
const MAX_FREE: usize = 4096;

thread_local! {
    static FREE: RefCell<Vec<(Layout, Vec<NonNull<u8>>)>> = const { RefCell::new(Vec::new()) };
}

fn take(layout: Layout) -> NonNull<u8> {
    let reused = FREE.with(|f| {
        let mut f = f.borrow_mut();
        f.iter_mut()
            .find(|(l, _)| *l == layout)
            .and_then(|(_, v)| v.pop())
    });
    if let Some(p) = reused {
        return p;
    }
    // SAFETY: `layout` has a non-zero size (checked by the caller).
    let p = unsafe { alloc(layout) };
    NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout))
}

fn give(layout: Layout, p: NonNull<u8>) {
    let kept = FREE
        .try_with(|f| {
            let mut f = f.borrow_mut();
            let i = match f.iter().position(|(l, _)| *l == layout) {
                Some(i) => i,
                None => {
                    f.push((layout, Vec::new()));
                    f.len() - 1
                }
            };
            let v = &mut f[i].1;
            if v.len() < MAX_FREE {
                v.push(p);
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: `p` was allocated by `alloc` with this exact layout and is no longer used.
        unsafe { dealloc(p.as_ptr(), layout) };
    }
}

/// A future stored in a recycled heap slot (like `Box::pin`, without a malloc per use
/// in steady state). Not `Send`: slots belong to the thread that made them.
pub struct Recycled<F: Future> {
    ptr: NonNull<F>,
    _own: PhantomData<F>,
    _local: PhantomData<*const ()>,
}

impl<F: Future> Recycled<F> {
    pub fn new(f: F) -> Self {
        let layout = Layout::new::<F>();
        if layout.size() == 0 {
            let ptr = NonNull::<F>::dangling();
            // SAFETY: writing a zero-sized value through a dangling, aligned pointer is allowed.
            unsafe { ptr.as_ptr().write(f) };
            return Recycled {
                ptr,
                _own: PhantomData,
                _local: PhantomData,
            };
        }
        let ptr = take(layout).cast::<F>();
        // SAFETY: the slot is valid for writes of `F` (size and alignment from `Layout::new::<F>`)
        // and uninitialised or previously dropped.
        unsafe { ptr.as_ptr().write(f) };
        Recycled {
            ptr,
            _own: PhantomData,
            _local: PhantomData,
        }
    }
}

impl<F: Future> Future for Recycled<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future lives at a fixed heap address until `Drop`, and is never moved
        // out, so pinning it in place is sound.
        unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()).poll(cx) }
    }
}

impl<F: Future> Drop for Recycled<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: the slot holds an initialised `F` that nothing else references.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        if layout.size() != 0 {
            give(layout, self.ptr.cast());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn slots_are_reused_and_values_dropped() {
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build();
        let mut rt = rt.unwrap();
        rt.block_on(async {
            let token = Rc::new(());
            let mut addrs = Vec::new();
            for i in 0..3u64 {
                let t = token.clone();
                let big = [i; 64];
                let f = Recycled::new(async move {
                    let _t = t;
                    big.iter().sum::<u64>()
                });
                addrs.push(f.ptr.as_ptr() as usize);
                assert_eq!(f.await, 64 * i);
            }
            // One slot served all three futures.
            assert!(addrs.windows(2).all(|w| w[0] == w[1]));
            assert_eq!(Rc::strong_count(&token), 1);
        });
    }
}
