//! Which deliveries one process may start now: at most `concurrency` at
//! once, and at most `per_receiver` of them to one receiver, so a receiver
//! that hangs until the timeout holds its share of the slots and no more.

use std::collections::HashMap;

/// Delivery slots in use, in all and per receiver.
#[derive(Debug)]
pub struct Slots {
    total: usize,
    per_receiver: usize,
    in_use: usize,
    by_receiver: HashMap<String, usize>,
}

impl Slots {
    /// `total` slots, `per_receiver` of them at most to one receiver (both
    /// at least 1; a share above `total` is `total`).
    pub fn new(total: usize, per_receiver: usize) -> Slots {
        let total = total.max(1);
        Slots {
            total,
            per_receiver: per_receiver.clamp(1, total),
            in_use: 0,
            by_receiver: HashMap::new(),
        }
    }

    /// How many callbacks one claim may take now, whoever their receivers
    /// are, without any receiver passing its share: the free slots, but no
    /// more than the smallest room a receiver that is not full has left
    /// (the claim may hand them all to that one receiver). 0 when all
    /// slots are in use.
    pub fn room(&self) -> usize {
        self.by_receiver
            .values()
            .filter(|&&n| n < self.per_receiver)
            .map(|&n| self.per_receiver - n)
            .fold(
                (self.total - self.in_use).min(self.per_receiver),
                usize::min,
            )
    }

    /// The receivers that have their full share: a claim leaves them out.
    pub fn full(&self) -> Vec<String> {
        let mut full: Vec<String> = self
            .by_receiver
            .iter()
            .filter(|&(_, &n)| n >= self.per_receiver)
            .map(|(receiver, _)| receiver.clone())
            .collect();
        full.sort();
        full
    }

    /// A delivery to `receiver` starts.
    pub fn take(&mut self, receiver: &str) {
        debug_assert!(
            self.in_use < self.total,
            "a slot was taken beyond the total"
        );
        self.in_use += 1;
        *self.by_receiver.entry(receiver.to_owned()).or_default() += 1;
    }

    /// A delivery to `receiver` ended (and was recorded).
    pub fn release(&mut self, receiver: &str) {
        self.in_use = self.in_use.saturating_sub(1);
        if let Some(n) = self.by_receiver.get_mut(receiver) {
            *n -= 1;
            if *n == 0 {
                self.by_receiver.remove(receiver);
            }
        }
    }

    /// Deliveries in flight.
    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_gets_its_share_and_the_others_the_rest() {
        let mut slots = Slots::new(4, 2);
        assert_eq!((slots.room(), slots.full()), (2, vec![]));
        slots.take("http://slow");
        // One claim could hand both remaining picks to the slow receiver.
        assert_eq!(slots.room(), 1);
        slots.take("http://slow");
        assert_eq!(slots.full(), vec!["http://slow".to_owned()]);
        // Left out of the claim, the slow receiver no longer limits it.
        assert_eq!(slots.room(), 2);
        slots.take("http://fast");
        slots.take("http://other");
        assert_eq!((slots.room(), slots.in_use()), (0, 4));
        slots.release("http://fast");
        assert_eq!(slots.room(), 1);
        slots.release("http://slow");
        assert_eq!((slots.room(), slots.full()), (1, vec![]));
        slots.release("http://slow");
        slots.release("http://other");
        assert_eq!((slots.room(), slots.in_use()), (2, 0));
        assert!(slots.by_receiver.is_empty());
    }

    #[test]
    fn a_share_of_every_slot_lets_one_receiver_take_them_all() {
        let mut slots = Slots::new(3, 3);
        assert_eq!(slots.room(), 3);
        for _ in 0..3 {
            slots.take("http://only");
        }
        assert_eq!((slots.room(), slots.full().len()), (0, 1));
        // Out-of-range shares are clamped rather than deadlocking.
        assert_eq!(Slots::new(2, 0).room(), 1);
        assert_eq!(Slots::new(2, 9).room(), 2);
    }

    #[test]
    fn no_sequence_of_claims_passes_a_share_or_the_total() {
        // The worst claim hands all of `room()` to one receiver that is not
        // full; rotate which one, and free slots now and then.
        let receivers = ["a", "b", "c"];
        for (total, share) in [(4, 2), (5, 2), (6, 3), (3, 1), (8, 4)] {
            let mut slots = Slots::new(total, share);
            for round in 0..30usize {
                let full = slots.full();
                let open: Vec<&str> = receivers
                    .into_iter()
                    .filter(|r| !full.iter().any(|f| f == r))
                    .collect();
                if let Some(target) = open.get(round % open.len().max(1)) {
                    for _ in 0..slots.room() {
                        slots.take(target);
                    }
                }
                assert!(slots.in_use() <= total, "{slots:?}");
                assert!(slots.by_receiver.values().all(|&n| n <= share), "{slots:?}");
                if round % 3 == 2 {
                    let busy: Vec<String> = slots.by_receiver.keys().cloned().collect();
                    for r in busy.iter().take(2) {
                        slots.release(r);
                    }
                }
            }
        }
    }
}
