//! A socket's outgoing packet queue: bounded like tokio's `mpsc` channel, with the subset of
//! its API that the transports use, but its memory follows its use.
//!
//! tokio's channel allocates a first block of 32 slots at creation, whatever its capacity,
//! and keeps it for the channel's life: 32 [`PacketBuf`](engineioxide_core::PacketBuf)s are
//! about 5.9 KB per socket, most of what an idle socket costs. Here the items live in a
//! [`VecDeque`] that is empty until a packet is queued and is given back whenever the
//! consumer finds it drained, so an idle socket holds no slot at all.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use tokio::sync::{
    Notify,
    mpsc::error::{TryRecvError, TrySendError},
};

struct State<T> {
    items: VecDeque<T>,
    /// The latest volatile item, taken after every queued one; a newer one replaces it.
    /// Boxed, as most sockets never send one.
    volatile: Option<Box<T>>,
    /// Slots held by [`Permit`]s that have not sent yet.
    reserved: usize,
    closed: bool,
    /// The consumer waiting in [`Receiver::poll_recv`].
    waker: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Woken when the queue is closed, for [`Sender::closed`].
    on_close: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while the lock is held leaves the queue consistent (every change is one
        // push, pop or counter update), so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes an item and wakes the consumer, outside the lock.
    fn push(&self, mut state: MutexGuard<'_, State<T>>, item: T) {
        state.items.push_back(item);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        if !state.closed {
            state.closed = true;
            // The consumer sees the end (`Ready(None)`) at once.
            let waker = state.waker.take();
            drop(state);
            self.on_close.notify_waiters();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// Creates a queue of at most `capacity` items (at least one).
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            volatile: None,
            reserved: 0,
            closed: false,
            waker: None,
        }),
        capacity: capacity.max(1),
        on_close: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The producing side; every method takes `&self`, as the socket is shared.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The consuming side. There is one consumer at a time: whoever holds the socket's
/// `internal_rx` lock (a polling request, or the WebSocket connection's task, which reads
/// through its own handle while it holds the lock).
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// One reserved slot of the queue: [`Permit::send`] fills it, dropping the permit frees it.
pub(crate) struct Permit<'a, T> {
    shared: &'a Shared<T>,
}

impl<T> Sender<T> {
    /// Queues an item, or gives it back if the queue is full or closed.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(item));
        }
        if state.items.len() + state.reserved >= self.shared.capacity {
            return Err(TrySendError::Full(item));
        }
        self.shared.push(state, item);
        Ok(())
    }

    /// Queues an item even when the queue is full: for a transport's own control packet
    /// (the `Noop` that ends a polling request before an upgrade), which must not wait
    /// behind the packets that filled the queue. Fails only when the queue is closed.
    pub(crate) fn force_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(item));
        }
        self.shared.push(state, item);
        Ok(())
    }

    /// Replaces the volatile item: it is not counted against the capacity, and is taken
    /// when the queue is otherwise empty. False if the queue is closed.
    pub(crate) fn send_volatile(&self, item: T) -> bool {
        let mut state = self.shared.lock();
        if state.closed {
            return false;
        }
        state.volatile = Some(Box::new(item));
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Reserves a slot, to be filled later without failing.
    pub(crate) fn try_reserve(&self) -> Result<Permit<'_, T>, TrySendError<()>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(()));
        }
        if state.items.len() + state.reserved >= self.shared.capacity {
            return Err(TrySendError::Full(()));
        }
        state.reserved += 1;
        Ok(Permit {
            shared: &self.shared,
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// A consumer's handle on this queue, for the WebSocket connection's task; see
    /// [`Receiver`] for the one-consumer rule.
    pub(crate) fn receiver(&self) -> Receiver<T> {
        Receiver {
            shared: self.shared.clone(),
        }
    }

    /// Waits until the queue is closed.
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.shared.on_close.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

impl<T> Permit<'_, T> {
    pub(crate) fn send(self, item: T) {
        let mut state = self.shared.lock();
        state.reserved -= 1;
        // A queue closed since the reservation drops the item, as tokio's permit does when
        // the receiver is gone.
        if state.closed {
            drop(state);
        } else {
            self.shared.push(state, item);
        }
        std::mem::forget(self);
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        self.shared.lock().reserved -= 1;
    }
}

impl<T> Receiver<T> {
    /// Takes the next item, the volatile one last; `Ready(None)` once the queue is closed
    /// and drained.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.lock();
        if let Some(item) = state
            .items
            .pop_front()
            .or_else(|| state.volatile.take().map(|v| *v))
        {
            return Poll::Ready(Some(item));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        release(&mut state.items);
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            waker @ None => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    #[cfg(any(test, feature = "__test_harness"))]
    pub(crate) async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub(crate) fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = self.shared.lock();
        if let Some(item) = state
            .items
            .pop_front()
            .or_else(|| state.volatile.take().map(|v| *v))
        {
            return Ok(item);
        }
        if state.closed {
            return Err(TryRecvError::Disconnected);
        }
        release(&mut state.items);
        Err(TryRecvError::Empty)
    }

    /// Puts an item back at the front, whatever the capacity: the packet a polling request
    /// took and could not send, for the WebSocket that follows it.
    pub(crate) fn push_front(&mut self, item: T) {
        self.shared.lock().items.push_front(item);
    }

    /// Closes the queue: nothing more can be queued; what is queued can still be taken.
    pub(crate) fn close(&mut self) {
        self.shared.close();
    }
}

/// Gives a drained queue's memory back. A busy socket allocates again at its next packet
/// (one small allocation per burst); an idle one, the common case, holds nothing.
fn release<T>(items: &mut VecDeque<T>) {
    if items.capacity() > 0 {
        *items = VecDeque::new();
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Sender")
            .field("len", &state.items.len())
            .field("reserved", &state.reserved)
            .field("capacity", &self.shared.capacity)
            .field("closed", &state.closed)
            .finish()
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_with_reservations_and_gives_memory_back() {
        let (tx, mut rx) = channel::<u32>(2);
        let permit = tx.try_reserve().unwrap();
        tx.try_send(1).unwrap();
        assert!(matches!(tx.try_send(2), Err(TrySendError::Full(2))));
        assert!(matches!(tx.try_reserve(), Err(TrySendError::Full(()))));
        drop(permit);
        tx.try_reserve().unwrap().send(2);
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        tx.force_send(3).unwrap();
        rx.push_front(0);
        assert_eq!(rx.try_recv(), Ok(0));
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(tx.shared.lock().items.capacity(), 0);
    }

    #[test]
    fn the_latest_volatile_item_comes_after_the_queued_ones() {
        let (tx, mut rx) = channel::<u32>(1);
        tx.try_send(1).unwrap();
        assert!(tx.send_volatile(2));
        assert!(tx.send_volatile(3));
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        rx.close();
        assert!(!tx.send_volatile(4));
    }

    #[test]
    fn closing_refuses_new_items_and_keeps_queued_ones() {
        let (tx, mut rx) = channel::<u32>(4);
        tx.try_send(1).unwrap();
        let permit = tx.try_reserve().unwrap();
        rx.close();
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(2), Err(TrySendError::Closed(2))));
        permit.send(3);
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(tx.shared.lock().reserved, 0);
    }

    #[tokio::test]
    async fn the_consumer_and_closed_are_woken() {
        let (tx, mut rx) = channel::<u32>(4);
        let consumer = tokio::spawn(async move {
            let first = rx.recv().await;
            rx.close();
            first
        });
        tokio::task::yield_now().await;
        tx.try_send(7).unwrap();
        tx.closed().await;
        assert_eq!(consumer.await.unwrap(), Some(7));
    }
}
