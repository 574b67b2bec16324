//! What a copy of a volume keeps besides its journal and its dirty maps (`VOLUME.meta`): its
//! role, its lineage, whether it is consistent, what it knows of each metro peer across
//! restarts, and a pending split-brain resolution. The daemon stores the encoded bytes
//! atomically (the file format around them is the daemon's); this module owns the contents.

use bytes::{BufMut, BytesMut};

use crate::generation::{GenerationInfo, Role, HISTORY_ENTRIES_MAX};
use crate::repl::{put_lineage, put_string, role_byte, FrameError, Reader};

/// Version of the encoded contents.
/// Version 2 added `catchup_lsn`; version 1 (no catch-up pending) is still read.
const META_VERSION: u16 = 2;
const META_VERSION_1: u16 = 1;
/// Most peers a meta records.
pub const META_PEERS_MAX: usize = 64;

/// What a copy remembers about one metro peer across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMeta {
    /// The peer's node name.
    pub name: String,
    /// The peer has been in sync with this copy at least once since this copy last took the
    /// lineage from somewhere else: it may hold this copy's data, so a restarted primary must
    /// hear from it before writing (fencing) and `on_disconnect = "suspend"` holds I/O when it
    /// is gone.
    pub protecting: bool,
}

/// The persisted state of one copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The role the operator (or a handshake) last gave this copy.
    pub role: Role,
    /// Volume id and generation history; `head_lsn` is not stored (the journal knows it) and
    /// is 0 in a decoded meta.
    pub lineage: GenerationInfo,
    /// False while a resync writes this copy out of order: it may not be promoted.
    pub consistent: bool,
    /// One entry per metro peer the copy has met.
    pub peers: Vec<PeerMeta>,
    /// `ferry resolve --discard-local` was run, naming the peer whose copy wins; cleared when
    /// the resync from it completes.
    pub resolving_with: Option<String>,
    /// A regional secondary's staged catch-up to this LSN is committed in its catch-up file
    /// and `lineage` already names where it leads; the device may not hold it yet. The
    /// daemon applies it at start before anything reads the volume, then clears this.
    pub catchup_lsn: Option<u64>,
}

impl Meta {
    /// The meta of a copy that has never held data, in `role`.
    pub fn empty(role: Role) -> Meta {
        Meta {
            role,
            lineage: GenerationInfo::empty(),
            consistent: true,
            peers: Vec::new(),
            resolving_with: None,
            catchup_lsn: None,
        }
    }

    /// Whether `peer` is recorded as protecting this copy.
    pub fn protecting(&self, peer: &str) -> bool {
        self.peers.iter().any(|p| p.name == peer && p.protecting)
    }

    /// Records whether `peer` protects this copy.
    pub fn set_protecting(&mut self, peer: &str, protecting: bool) {
        match self.peers.iter_mut().find(|p| p.name == peer) {
            Some(entry) => entry.protecting = protecting,
            None => self.peers.push(PeerMeta {
                name: peer.to_owned(),
                protecting,
            }),
        }
    }

    /// The encoded contents.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = BytesMut::new();
        out.put_u16_le(META_VERSION);
        out.put_u8(role_byte(self.role));
        out.put_u8(u8::from(self.consistent));
        let mut lineage = self.lineage.clone();
        lineage.head_lsn = 0;
        put_lineage(&mut out, &lineage)?;
        if self.peers.len() > META_PEERS_MAX {
            return Err(FrameError::TooManyEntries {
                count: self.peers.len(),
                max: META_PEERS_MAX,
            });
        }
        out.put_u8(crate::repl::count_field(self.peers.len(), META_PEERS_MAX)?);
        for peer in &self.peers {
            put_string(&mut out, &peer.name)?;
            out.put_u8(u8::from(peer.protecting));
        }
        match &self.resolving_with {
            None => out.put_u8(0),
            Some(peer) => {
                out.put_u8(1);
                put_string(&mut out, peer)?;
            }
        }
        match self.catchup_lsn {
            None => out.put_u8(0),
            Some(lsn) => {
                out.put_u8(1);
                out.put_u64_le(lsn);
            }
        }
        Ok(out.to_vec())
    }

    /// Decodes what [`encode`](Self::encode) wrote; refuses anything else.
    pub fn decode(bytes: &[u8]) -> Result<Meta, FrameError> {
        let mut r = Reader {
            payload: bytes::Bytes::copy_from_slice(bytes),
            message: "meta",
        };
        let version = r.u16()?;
        if version != META_VERSION && version != META_VERSION_1 {
            return Err(FrameError::Invalid("meta version"));
        }
        let role = r.role()?;
        let consistent = r.bool()?;
        let lineage = r.lineage()?;
        if lineage.history.len() > HISTORY_ENTRIES_MAX {
            return Err(FrameError::Invalid("meta history"));
        }
        let count = usize::from(r.u8()?);
        if count > META_PEERS_MAX {
            return Err(FrameError::TooManyEntries {
                count,
                max: META_PEERS_MAX,
            });
        }
        let mut peers = Vec::with_capacity(count);
        for _ in 0..count {
            peers.push(PeerMeta {
                name: r.string()?,
                protecting: r.bool()?,
            });
        }
        let resolving_with = if r.bool()? { Some(r.string()?) } else { None };
        let catchup_lsn = if version >= META_VERSION && r.bool()? {
            Some(r.u64()?)
        } else {
            None
        };
        r.finish()?;
        Ok(Meta {
            role,
            lineage,
            consistent,
            peers,
            resolving_with,
            catchup_lsn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::GenerationEntry;

    #[test]
    fn round_trip_and_refusals() {
        let mut meta = Meta::empty(Role::Primary);
        meta.lineage = GenerationInfo::create(7, "a").unwrap();
        meta.lineage.history.push(GenerationEntry {
            generation: 0x2_0001,
            start_lsn: 5,
            promoted_by: "b".into(),
        });
        meta.lineage.head_lsn = 9;
        meta.consistent = false;
        meta.set_protecting("b", true);
        meta.set_protecting("c", false);
        meta.resolving_with = Some("b".into());
        meta.catchup_lsn = Some(41);
        let bytes = meta.encode().unwrap();
        let decoded = Meta::decode(&bytes).unwrap();
        let mut expected = meta.clone();
        expected.lineage.head_lsn = 0;
        assert_eq!(decoded, expected);
        assert!(decoded.protecting("b"));
        assert!(!decoded.protecting("c"));
        assert!(!decoded.protecting("d"));
        assert!(Meta::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Meta::decode(&trailing).is_err());
        let mut version = bytes;
        version[0] = 9;
        assert!(Meta::decode(&version).is_err());
    }

    #[test]
    fn a_version_1_meta_still_reads() {
        let mut meta = Meta::empty(Role::Secondary);
        meta.lineage = GenerationInfo::create(7, "a").unwrap();
        let mut bytes = meta.encode().unwrap();
        // Version 1 ended after `resolving_with`.
        bytes[0..2].copy_from_slice(&META_VERSION_1.to_le_bytes());
        bytes.pop();
        let decoded = Meta::decode(&bytes).unwrap();
        assert_eq!(decoded, meta);
    }
}
