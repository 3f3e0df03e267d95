//! A slab of in-flight state indexed by small integers (io_uring user_data, operation ids).

/// Slots reused through a free list.
pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Store a value; returns its key.
    pub fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(k) => {
                self.slots[k] = Some(v);
                k
            }
            None => {
                self.slots.push(Some(v));
                self.slots.len() - 1
            }
        }
    }
    /// Remove and return the value at `k`.
    pub fn remove(&mut self, k: usize) -> Option<T> {
        let v = self.slots.get_mut(k)?.take();
        if v.is_some() {
            self.free.push(k);
        }
        v
    }
    /// Drop the value at `k` where it lies (no move out of a large value); returns
    /// whether there was one.
    pub fn discard(&mut self, k: usize) -> bool {
        match self.slots.get_mut(k) {
            Some(slot @ Some(_)) => {
                *slot = None;
                self.free.push(k);
                true
            }
            _ => false,
        }
    }
    /// The value at `k`.
    pub fn get(&self, k: usize) -> Option<&T> {
        self.slots.get(k)?.as_ref()
    }
    /// The value at `k`, mutably.
    pub fn get_mut(&mut self, k: usize) -> Option<&mut T> {
        self.slots.get_mut(k)?.as_mut()
    }
    /// Number of values stored.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
