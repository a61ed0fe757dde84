//! The one backoff every retry loop in Ferry waits by: the first delay, doubled after each
//! failure, never more than the cap. Loops with their own structure (the catalog's races,
//! the agent's upload budget) take delays from it; plain "call until it works" loops use
//! `ferry_mesh::retry`, which also tells permanent errors from transient ones.
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    waited: u32,
}

impl Backoff {
    /// Delays `first`, `2 × first`, `4 × first` … up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            next: first.min(max),
            max,
            waited: 0,
        }
    }

    /// The delay before the next attempt; the one after it doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        self.waited += 1;
        d
    }

    /// How many delays were handed out (the failed attempts so far).
    pub fn failures(&self) -> u32 {
        self.waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(1000));
        let got: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        assert_eq!(b.failures(), 5);
        assert_eq!(Backoff::new(ms(50), ms(10)).next_delay(), ms(10));
    }
}
