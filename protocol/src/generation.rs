//! Volume generations and the pure decision function run when two copies meet.
//!
//! A *generation* names a period in which one node, the one that started it, was the only
//! writer of a volume's lineage. Every copy keeps a bounded history of the generations it has
//! held, newest last, each with the first LSN written in it. When two copies connect, both run
//! [`decide`] over the two histories and act on the same answer (the answers are exchanged and
//! must mirror each other).
//!
//! # The rules the callers follow (they are what makes [`decide`] sound)
//!
//! A node starts a new generation with [`GenerationInfo::start_generation`]:
//!
//! 1. when it is promoted (planned or forced);
//! 2. when, as primary, it is about to complete a write that a peer may not have (it lost its
//!    in-sync peer: degraded), *before* completing that write;
//! 3. when, as primary, it restarts, before its first write (a power loss may have cut its
//!    journal tail while the peer kept those records).
//!
//! A new generation is never reused, even when nothing was written in the previous one: a
//! degraded primary that kept writing in a generation its peer already knew would make its
//! completed writes look like an in-flight tail, and they would be discarded silently.
//!
//! With those rules, inside one generation only its starter writes, and any other copy holding
//! that generation holds a prefix of the starter's records, except for a tail of writes that
//! were in flight (never completed to a client) when the link or the node died. A copy *wrote
//! since the split* exactly when it holds a record labelled with a generation the other copy
//! has never seen. That is what tells a split brain (both did) from a copy that is merely
//! behind (one did, or neither did), which is where DRBD and Ceph had false positives.
//!
//! Generation numbers are `(counter << 16) | node_tag`: the counter is one more than every
//! generation the promoting node has seen, and the tag is a hash of the node name, so two nodes
//! promoting concurrently from the same state pick different numbers. Entries are compared as
//! a whole (number, start LSN, node name), so even a tag collision cannot make two different
//! promotions look like the same one.

use thiserror::Error;

/// Entries kept in a history; the oldest are dropped first. A copy whose common generation
/// with its peer has been dropped is treated as unrelated and needs a full sync.
pub const MAX_HISTORY_ENTRIES: usize = 64;
/// Longest node name a history entry holds.
pub const MAX_NODE_NAME_BYTES: usize = 255;
/// Low bits of a generation number that carry the node tag.
const NODE_TAG_BITS: u32 = 16;
/// The counter must fit in the bits above the tag.
const MAX_COUNTER: u64 = u64::MAX >> NODE_TAG_BITS;

/// Why a generation history is not valid, or cannot be extended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GenerationError {
    /// The history holds more entries than [`MAX_HISTORY_ENTRIES`].
    #[error("history has {count} entries, at most {MAX_HISTORY_ENTRIES} allowed")]
    TooManyEntries { count: usize },
    /// Generation numbers must strictly increase from oldest to newest.
    #[error("generation {next:#x} follows {previous:#x}; generations must increase")]
    NotIncreasing { previous: u64, next: u64 },
    /// Start LSNs must not decrease from oldest to newest.
    #[error("generation start LSN {next} follows {previous}; start LSNs must not decrease")]
    StartLsnDecreasing { previous: u64, next: u64 },
    /// A generation cannot start more than one LSN past the copy's head.
    #[error("generation {generation:#x} starts at LSN {start_lsn}, past head LSN {head_lsn} + 1")]
    StartBeyondHead { generation: u64, start_lsn: u64, head_lsn: u64 },
    /// A node name is empty or longer than [`MAX_NODE_NAME_BYTES`].
    #[error("node name of {len_bytes} bytes; 1 to {MAX_NODE_NAME_BYTES} allowed")]
    BadNodeName { len_bytes: usize },
    /// A lineage with history must have a non-zero volume id, and an empty one a zero id.
    #[error("volume id {volume_id:#x} does not match a history of {entries} entries")]
    VolumeIdMismatch { volume_id: u64, entries: usize },
    /// The generation counter would overflow (2^48 promotions: never in practice).
    #[error("generation counter exhausted")]
    CounterExhausted,
    /// The LSN counter would overflow.
    #[error("LSN counter exhausted")]
    LsnExhausted,
    /// A learned generation does not continue this copy's history.
    #[error("generation {generation:#x} starting at LSN {start_lsn} does not follow this copy (head LSN {head_lsn}, current {current:#x})")]
    DoesNotFollow { generation: u64, start_lsn: u64, head_lsn: u64, current: u64 },
}

/// A node's role for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Accepts client writes and ships them.
    Primary,
    /// Receives writes from the primary; its export is read-only.
    Secondary,
}

impl Role {
    /// The name used by `ferry status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// One generation a copy has held.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GenerationEntry {
    /// `(counter << 16) | node_tag`; unique per promotion.
    pub generation: u64,
    /// The first LSN written in this generation (the head LSN + 1 when it started).
    pub start_lsn: u64,
    /// The node that started the generation, the only writer in it.
    pub promoted_by: String,
}

/// What a copy knows about its lineage; persisted, and sent in every hello.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct GenerationInfo {
    /// Random identity of the volume's lineage, set at creation; 0 for a copy never synced.
    pub volume_id: u64,
    /// Generations this copy has held, oldest first; the last one is current. Empty for a
    /// copy that has never been synced (it holds no data of any lineage).
    pub history: Vec<GenerationEntry>,
    /// The newest LSN this copy holds in its journal (0: none yet).
    pub head_lsn: u64,
}

/// What two copies should do, from the local copy's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Same current generation: the copies hold the same records up to the lower head;
    /// replication resumes from the peer's head.
    Same,
    /// The remote copy is behind: it must discard its records after `common_lsn` and receive
    /// everything local holds after `common_lsn` (a delta resync from local).
    LocalAhead { common_generation: u64, common_lsn: u64 },
    /// The local copy is behind: it must discard its records after `common_lsn` and receive
    /// everything the remote holds after it.
    RemoteAhead { common_generation: u64, common_lsn: u64 },
    /// Both copies wrote after they split at `common_lsn` of `common_generation`: an operator
    /// must choose which writes to discard.
    SplitBrain { common_generation: u64, common_lsn: u64 },
    /// Different lineages, or no common generation left in the bounded histories.
    Unrelated,
    /// The local copy has never been synced: it needs a full sync from the remote.
    LocalEmpty,
    /// The remote copy has never been synced: it needs a full sync from local.
    RemoteEmpty,
    /// Both copies are primary in the same generation: a misconfiguration.
    BothPrimary,
}

impl Decision {
    /// The same decision seen from the other copy.
    pub fn mirror(self) -> Decision {
        match self {
            Decision::LocalAhead { common_generation, common_lsn } => Decision::RemoteAhead { common_generation, common_lsn },
            Decision::RemoteAhead { common_generation, common_lsn } => Decision::LocalAhead { common_generation, common_lsn },
            Decision::LocalEmpty => Decision::RemoteEmpty,
            Decision::RemoteEmpty => Decision::LocalEmpty,
            other => other,
        }
    }

    /// A short stable name for logs and `last_error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Same => "same",
            Decision::LocalAhead { .. } => "local-ahead",
            Decision::RemoteAhead { .. } => "remote-ahead",
            Decision::SplitBrain { .. } => "split-brain",
            Decision::Unrelated => "unrelated",
            Decision::LocalEmpty => "local-empty",
            Decision::RemoteEmpty => "remote-empty",
            Decision::BothPrimary => "both-primary",
        }
    }
}

/// The 16-bit tag of a node name (CRC-32 folded), the low bits of its generation numbers.
pub fn node_tag(node: &str) -> u64 {
    let crc = crc32fast::hash(node.as_bytes());
    u64::from((crc ^ (crc >> 16)) & 0xffff)
}

fn check_node_name(node: &str) -> Result<(), GenerationError> {
    if node.is_empty() || node.len() > MAX_NODE_NAME_BYTES {
        return Err(GenerationError::BadNodeName { len_bytes: node.len() });
    }
    Ok(())
}

impl GenerationInfo {
    /// A copy that has never been synced.
    pub fn empty() -> GenerationInfo {
        GenerationInfo::default()
    }

    /// A new lineage created on `node` (first start as primary): generation counter 1.
    pub fn create(volume_id: u64, node: &str) -> Result<GenerationInfo, GenerationError> {
        check_node_name(node)?;
        if volume_id == 0 {
            return Err(GenerationError::VolumeIdMismatch { volume_id, entries: 1 });
        }
        let entry = GenerationEntry { generation: (1 << NODE_TAG_BITS) | node_tag(node), start_lsn: 1, promoted_by: node.to_owned() };
        Ok(GenerationInfo { volume_id, history: vec![entry], head_lsn: 0 })
    }

    /// Whether this copy holds no lineage at all.
    pub fn is_empty(&self) -> bool {
        self.history.is_empty()
    }

    /// The current generation entry, if any.
    pub fn current(&self) -> Option<&GenerationEntry> {
        self.history.last()
    }

    /// The current generation number (0 for an empty copy).
    pub fn current_generation(&self) -> u64 {
        self.current().map_or(0, |entry| entry.generation)
    }

    /// Starts a new generation on `node` (promotion, degrade, restart as primary: see the
    /// module doc). `highest_seen_generation` is the highest generation this node has seen
    /// from any peer, so the new number is above every generation either side knows.
    pub fn start_generation(&mut self, node: &str, highest_seen_generation: u64) -> Result<&GenerationEntry, GenerationError> {
        check_node_name(node)?;
        if self.is_empty() {
            // Promoting a never-synced copy would invent a lineage; create() is the way.
            return Err(GenerationError::VolumeIdMismatch { volume_id: self.volume_id, entries: 0 });
        }
        let highest = self.current_generation().max(highest_seen_generation);
        let counter = (highest >> NODE_TAG_BITS).checked_add(1).filter(|c| *c <= MAX_COUNTER).ok_or(GenerationError::CounterExhausted)?;
        let start_lsn = self.head_lsn.checked_add(1).ok_or(GenerationError::LsnExhausted)?;
        let entry = GenerationEntry { generation: (counter << NODE_TAG_BITS) | node_tag(node), start_lsn, promoted_by: node.to_owned() };
        self.push(entry);
        Ok(self.history.last().expect("just pushed"))
    }

    /// Learns a generation the peer started while this copy was in sync with it (a
    /// `RoleChange` after a planned promotion): it must start right after this copy's head.
    pub fn learn(&mut self, entry: GenerationEntry) -> Result<(), GenerationError> {
        check_node_name(&entry.promoted_by)?;
        let follows = !self.is_empty() && entry.generation > self.current_generation() && Some(entry.start_lsn) == self.head_lsn.checked_add(1);
        if !follows {
            return Err(GenerationError::DoesNotFollow { generation: entry.generation, start_lsn: entry.start_lsn, head_lsn: self.head_lsn, current: self.current_generation() });
        }
        self.push(entry);
        Ok(())
    }

    /// Takes over the lineage of the copy it was resynced from, holding records up to
    /// `head_lsn`.
    pub fn adopt(&mut self, ahead: &GenerationInfo, head_lsn: u64) {
        self.volume_id = ahead.volume_id;
        self.history = ahead.history.clone();
        self.head_lsn = head_lsn;
    }

    fn push(&mut self, entry: GenerationEntry) {
        if let Some(last) = self.history.last() {
            assert!(entry.generation > last.generation, "generations only grow");
            assert!(entry.start_lsn >= last.start_lsn, "generation start LSNs never go back");
        }
        if self.history.len() >= MAX_HISTORY_ENTRIES {
            self.history.remove(0);
        }
        self.history.push(entry);
    }

    /// Checks what [`decide`] relies on; run on every history received from the network.
    pub fn validate(&self) -> Result<(), GenerationError> {
        if self.history.len() > MAX_HISTORY_ENTRIES {
            return Err(GenerationError::TooManyEntries { count: self.history.len() });
        }
        if self.history.is_empty() != (self.volume_id == 0) {
            return Err(GenerationError::VolumeIdMismatch { volume_id: self.volume_id, entries: self.history.len() });
        }
        for pair in self.history.windows(2) {
            if pair[1].generation <= pair[0].generation {
                return Err(GenerationError::NotIncreasing { previous: pair[0].generation, next: pair[1].generation });
            }
            if pair[1].start_lsn < pair[0].start_lsn {
                return Err(GenerationError::StartLsnDecreasing { previous: pair[0].start_lsn, next: pair[1].start_lsn });
            }
        }
        for entry in &self.history {
            check_node_name(&entry.promoted_by)?;
            if entry.start_lsn > self.head_lsn.saturating_add(1) {
                return Err(GenerationError::StartBeyondHead { generation: entry.generation, start_lsn: entry.start_lsn, head_lsn: self.head_lsn });
            }
        }
        Ok(())
    }

    /// One past the last LSN this copy holds in the generation at `index`: where the next
    /// generation took over, or its head if it never left it.
    fn end_lsn_of(&self, index: usize) -> u64 {
        let after_head = self.head_lsn.saturating_add(1);
        match self.history.get(index + 1) {
            Some(next) => next.start_lsn.min(after_head),
            None => after_head,
        }
    }

    /// Whether this copy holds records of a generation after the one at `index`.
    fn wrote_after(&self, index: usize) -> bool {
        self.history.get(index + 1).is_some_and(|next| next.start_lsn <= self.head_lsn)
    }
}

/// Decides how two copies relate. Pure, total (never panics, whatever the inputs), and
/// antisymmetric: `decide(b, rb, a, ra) == decide(a, ra, b, rb).mirror()`. Inputs should have
/// passed [`GenerationInfo::validate`]; invalid ones still get an answer, not a panic.
pub fn decide(local: &GenerationInfo, local_role: Role, remote: &GenerationInfo, remote_role: Role) -> Decision {
    match (local.is_empty(), remote.is_empty()) {
        (true, true) => return Decision::Unrelated,
        (true, false) => return Decision::LocalEmpty,
        (false, true) => return Decision::RemoteEmpty,
        (false, false) => {}
    }
    if local.volume_id != remote.volume_id {
        return Decision::Unrelated;
    }
    // The newest entry both hold. Generations strictly increase in a valid history, so the
    // newest common entry is the same whichever side the search starts from.
    let common = local
        .history
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, entry)| remote.history.iter().position(|other| other == entry).map(|j| (i, j)));
    let Some((local_index, remote_index)) = common else {
        return Decision::Unrelated;
    };
    let common_generation = local.history[local_index].generation;
    // Both hold the same records below the first LSN where either left the common
    // generation or stopped receiving; after it, at least one of them differs or is missing.
    let common_lsn = local.end_lsn_of(local_index).min(remote.end_lsn_of(remote_index)).saturating_sub(1);
    let local_wrote = local.wrote_after(local_index);
    let remote_wrote = remote.wrote_after(remote_index);
    if local_wrote && remote_wrote {
        return Decision::SplitBrain { common_generation, common_lsn };
    }
    let local_newer = &local.history[local_index + 1..];
    let remote_newer = &remote.history[remote_index + 1..];
    if local_newer.is_empty() && remote_newer.is_empty() {
        if local_role == Role::Primary && remote_role == Role::Primary {
            return Decision::BothPrimary;
        }
        return Decision::Same;
    }
    // Exactly one copy wrote, or neither did but at least one started a generation the other
    // never saw. Records past `common_lsn` on the side that did not write in a newer
    // generation are an in-flight tail (never completed to a client, by rule 2), so it is
    // the one that yields. If neither wrote, the newest generation wins; any fixed,
    // symmetric order would do, since no completed write is lost either way.
    let local_ahead = if local_wrote || remote_wrote {
        local_wrote
    } else {
        let key = |entries: &[GenerationEntry]| entries.last().map(|e| (e.generation, e.promoted_by.clone()));
        key(local_newer) > key(remote_newer)
    };
    if local_ahead {
        Decision::LocalAhead { common_generation, common_lsn }
    } else {
        Decision::RemoteAhead { common_generation, common_lsn }
    }
}
