package chat

import (
	"context"
	"sync"
)

// AckWindow bounds the sends of one connection (a client's, or a child's
// channel) that wait for their ack, so that the room never finds the
// connection's ack channel full and drops an ack: give Submit a channel of
// the window's size. A send whose id is in flight on the connection already
// takes no second place (the room acks an id once per channel).
type AckWindow struct {
	slots chan struct{}

	mu  sync.Mutex // guards ids
	ids map[string]struct{}
}

// NewAckWindow returns a window of n sends.
func NewAckWindow(n int) *AckWindow {
	return &AckWindow{slots: make(chan struct{}, n), ids: make(map[string]struct{})}
}

// Size is the window's size: the capacity the ack channel needs.
func (w *AckWindow) Size() int { return cap(w.slots) }

// Acquire takes a place for id, waiting while the window is full. It
// returns false when id is in flight already (no place taken: do not
// submit it again).
func (w *AckWindow) Acquire(ctx context.Context, id string) (bool, error) {
	w.mu.Lock()
	_, dup := w.ids[id]
	w.mu.Unlock()
	if dup {
		return false, nil
	}
	select {
	case w.slots <- struct{}{}:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, dup := w.ids[id]; dup { // taken meanwhile by another goroutine
		<-w.slots
		return false, nil
	}
	w.ids[id] = struct{}{}
	return true, nil
}

// Release gives back id's place once its ack arrived.
func (w *AckWindow) Release(id string) {
	w.mu.Lock()
	_, ok := w.ids[id]
	delete(w.ids, id)
	w.mu.Unlock()
	if ok {
		<-w.slots
	}
}
