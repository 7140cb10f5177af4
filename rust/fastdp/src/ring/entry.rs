//! A ring entry: the token that starts a range, who owns it, and the versioned state merge compares.

/// Entry i owns [token_i, token_{i+1}); the last entry wraps round to the first token.
///
/// Two clocks, so that free-space hints never disturb ownership:
/// - `version` counts ownership changes (grant +1, transfer +100); new tokens start at 0.
/// - `free_seq` counts free-hint updates by the owner since the last ownership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub token: u64,
    pub owner: u64,
    pub version: u64,
    pub free_seq: u64,
    /// The owner's last report of free addresses in this entry's range: a hint, <= the range size.
    pub free: u64,
}

impl Entry {
    /// A freshly inserted token.
    pub fn new(token: u64, owner: u64, free: u64) -> Self {
        Self {
            token,
            owner,
            version: 0,
            free_seq: 0,
            free,
        }
    }

    /// Merge keeps, per token, the entry with the greatest precedence.
    ///
    /// The order is lexicographic over every field but the token, so it is total: two entries
    /// for one token either are identical or one strictly wins, on every replica alike. Ownership
    /// (version, then the numerically higher owner as the tie-break) decides first; the free hint
    /// only orders entries that agree on ownership, newest report first.
    pub fn precedence(&self) -> (u64, u64, u64, u64) {
        (self.version, self.owner, self.free_seq, self.free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_orders_ownership_before_hints() {
        let base = Entry {
            token: 10,
            owner: 5,
            version: 3,
            free_seq: 9,
            free: 100,
        };
        let newer_owner = Entry {
            version: 4,
            free_seq: 0,
            free: 0,
            ..base
        };
        let tie_higher_peer = Entry {
            owner: 6,
            free_seq: 0,
            free: 0,
            ..base
        };
        let newer_hint = Entry {
            free_seq: 10,
            free: 1,
            ..base
        };
        let bigger_hint = Entry { free: 101, ..base };
        assert!(newer_owner.precedence() > base.precedence());
        assert!(tie_higher_peer.precedence() > base.precedence());
        assert!(newer_hint.precedence() > base.precedence());
        assert!(bigger_hint.precedence() > base.precedence());
    }
}
