//! One client address's share of a capped resource (UDP queries in flight,
//! TCP connections): at most half, so that one pod flooding the proxy — a
//! stuck retry loop, DNS tunnelling to a slow server — leaves the node's
//! other apps the other half. Host-network processes share the node's
//! address, and so one share.

use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// What each client address (or other key) holds of a cap.
#[derive(Debug)]
pub(crate) struct Shares<K = IpAddr> {
    /// The most one key may hold: half the cap (all of a cap of 1).
    share: usize,
    /// Only keys that hold one or more. (Counted per query: foldhash, seeded
    /// at random, not SipHash.)
    held: crate::FastMap<K, usize>,
}

impl Shares {
    pub(crate) fn of(cap: usize) -> Shares {
        Shares::each(cap / 2)
    }
}

impl<K: std::hash::Hash + Eq> Shares<K> {
    /// At most `share` (1 at least) for each key.
    pub(crate) fn each(share: usize) -> Shares<K> {
        Shares { share: share.max(1), held: crate::FastMap::default() }
    }

    /// Counts one more for `client`, unless it already holds its share.
    pub(crate) fn hold(&mut self, client: K) -> bool {
        let held = self.held.entry(client).or_insert(0);
        if *held >= self.share {
            return false;
        }
        *held += 1;
        true
    }

    /// `client` gave one back (one hash of the address, not two: this runs
    /// per query).
    pub(crate) fn release(&mut self, client: K) {
        if let Entry::Occupied(mut held) = self.held.entry(client) {
            *held.get_mut() = held.get().saturating_sub(1);
            if *held.get() == 0 {
                held.remove();
            }
        }
    }
}

/// One count against a client address's share, given back on drop.
#[derive(Debug)]
pub(crate) struct ClientShare {
    shares: Arc<Mutex<Shares>>,
    client: IpAddr,
}

impl ClientShare {
    /// `None`: `client` already holds its share.
    pub(crate) fn take(shares: &Arc<Mutex<Shares>>, client: IpAddr) -> Option<ClientShare> {
        let mut held = shares.lock().unwrap_or_else(PoisonError::into_inner);
        held.hold(client).then(|| ClientShare { shares: Arc::clone(shares), client })
    }

    pub(crate) fn client(&self) -> IpAddr {
        self.client
    }
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        self.shares.lock().unwrap_or_else(PoisonError::into_inner).release(self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_half_and_gets_it_back() {
        let (a, b) = (IpAddr::from([198, 18, 0, 1]), IpAddr::from([198, 18, 0, 2]));
        let mut shares = Shares::of(4);
        assert!(shares.hold(a) && shares.hold(a));
        assert!(!shares.hold(a), "past half of the cap");
        assert!(shares.hold(b), "another address has its own share");
        shares.release(a);
        assert!(shares.hold(a), "a share given back can be taken again");
        let mut one = Shares::of(1);
        assert!(one.hold(a), "a cap of 1 is all one address's");
        shares.release(b);
        assert!(!shares.held.contains_key(&b), "an address holding nothing is forgotten");
    }
}
