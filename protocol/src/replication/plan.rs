//! What a link carries after a handshake: the pure table from the decision over the two
//! lineages and the two sides' roles and states to a [`Plan`]. Both sides compute it from the
//! same two hellos, so their plans mirror each other (checked exhaustively in the tests).

use crate::generation::{Decision, Role};

/// One side of a handshake, as its hello describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub role: Role,
    pub head_lsn: u64,
    pub consistent: bool,
    /// The operator chose to discard this side's writes since a split brain with the other.
    pub discarding_local: bool,
    /// Orders the two sides when both discard (the node name compares; distinct per side).
    pub name_rank: u8,
}

/// What this side does with the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// This side is the primary and the peer takes its data: records from `from_lsn` on
    /// when `resync` is false (the peer holds this side's records up to `from_lsn`), or a
    /// resync of the blocks either side changed since `from_lsn` (the peer first reports its
    /// own changed blocks, including any records it holds past `from_lsn`).
    Ship {
        resync: bool,
        full: bool,
        from_lsn: u64,
    },
    /// The mirror of `Ship`: the peer is the primary and this side takes its data.
    Receive {
        resync: bool,
        full: bool,
        from_lsn: u64,
    },
    /// No data flows (both secondary, or the primary side must first demote).
    Idle,
    /// This side is primary but the peer holds newer data: this side must demote.
    Demote,
    /// Both sides wrote since they split; an operator must choose.
    SplitBrain { common_lsn: u64 },
    /// The copies cannot replicate (unrelated lineages, both primary in one generation).
    Refuse,
}

/// The decision as a pending split-brain resolution changes it: a split brain where exactly
/// one side discards its writes becomes that side being behind. If both were told to (two
/// operators at once, while the copies were apart), the one with the smaller node name keeps
/// its writes: each discarded side was asked for, and the answer must not depend on who
/// computes it.
pub fn resolve(decision: Decision, local: &Side, remote: &Side) -> Decision {
    match decision {
        // A side discarding its writes gives way even where it would be ahead (an interrupted
        // resync left it inconsistent with a newer lineage than the copy it now takes).
        Decision::LocalAhead {
            common_generation,
            common_lsn,
        } if local.discarding_local && !remote.discarding_local => Decision::RemoteAhead {
            common_generation,
            common_lsn,
        },
        Decision::RemoteAhead {
            common_generation,
            common_lsn,
        } if remote.discarding_local && !local.discarding_local => Decision::LocalAhead {
            common_generation,
            common_lsn,
        },
        Decision::SplitBrain {
            common_generation,
            common_lsn,
        } if local.discarding_local && !remote.discarding_local => Decision::RemoteAhead {
            common_generation,
            common_lsn,
        },
        Decision::SplitBrain {
            common_generation,
            common_lsn,
        } if remote.discarding_local && !local.discarding_local => Decision::LocalAhead {
            common_generation,
            common_lsn,
        },
        Decision::SplitBrain {
            common_generation,
            common_lsn,
        } if local.discarding_local && remote.discarding_local => {
            if local.name_rank < remote.name_rank {
                Decision::LocalAhead {
                    common_generation,
                    common_lsn,
                }
            } else {
                Decision::RemoteAhead {
                    common_generation,
                    common_lsn,
                }
            }
        }
        other => other,
    }
}

/// The plan of the local side. See the module doc.
pub fn plan(decision: Decision, local: &Side, remote: &Side) -> Plan {
    use Role::{Primary, Secondary};
    match (resolve(decision, local, remote), local.role, remote.role) {
        (Decision::Unrelated | Decision::BothPrimary, _, _) => Plan::Refuse,
        (Decision::SplitBrain { common_lsn, .. }, _, _) => Plan::SplitBrain { common_lsn },
        (Decision::Same, Primary, Secondary) => {
            let from_lsn = remote.head_lsn.min(local.head_lsn);
            Plan::Ship {
                resync: remote.head_lsn != local.head_lsn || !remote.consistent,
                full: false,
                from_lsn,
            }
        }
        (Decision::Same, Secondary, Primary) => {
            let from_lsn = remote.head_lsn.min(local.head_lsn);
            Plan::Receive {
                resync: remote.head_lsn != local.head_lsn || !local.consistent,
                full: false,
                from_lsn,
            }
        }
        (Decision::Same, Primary, Primary) => Plan::Refuse,
        (Decision::Same, Secondary, Secondary) => Plan::Idle,
        (Decision::LocalAhead { common_lsn, .. }, Primary, Secondary) => Plan::Ship {
            resync: true,
            full: false,
            from_lsn: common_lsn,
        },
        (Decision::RemoteAhead { common_lsn, .. }, Secondary, Primary) => Plan::Receive {
            resync: true,
            full: false,
            from_lsn: common_lsn,
        },
        // A primary gives way to a copy with newer data, never to one a resync left
        // inconsistent (it has nothing whole to serve): that copy waits for an operator.
        (Decision::RemoteAhead { .. }, Primary, _) if !remote.consistent => Plan::Idle,
        (Decision::RemoteAhead { .. }, Primary, _) => Plan::Demote,
        (Decision::LocalAhead { .. }, _, _) | (Decision::RemoteAhead { .. }, _, _) => Plan::Idle,
        (Decision::RemoteEmpty, Primary, Secondary) => Plan::Ship {
            resync: true,
            full: true,
            from_lsn: 0,
        },
        (Decision::LocalEmpty, Secondary, Primary) => Plan::Receive {
            resync: true,
            full: true,
            from_lsn: 0,
        },
        // A primary that holds nothing meets one that holds a lineage: it gives way.
        (Decision::LocalEmpty, Primary, _) => Plan::Demote,
        (Decision::RemoteEmpty | Decision::LocalEmpty, _, _) => Plan::Idle,
    }
}

/// The plan the other side computes, given this side's plan (for the mirror check).
pub fn mirror(plan: Plan) -> Option<Plan> {
    match plan {
        Plan::Ship {
            resync,
            full,
            from_lsn,
        } => Some(Plan::Receive {
            resync,
            full,
            from_lsn,
        }),
        Plan::Receive {
            resync,
            full,
            from_lsn,
        } => Some(Plan::Ship {
            resync,
            full,
            from_lsn,
        }),
        Plan::SplitBrain { common_lsn } => Some(Plan::SplitBrain { common_lsn }),
        Plan::Refuse => Some(Plan::Refuse),
        // A side that must demote faces one that waits for it (or also demotes).
        Plan::Demote | Plan::Idle => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_side() -> impl Strategy<Value = Side> {
        (any::<bool>(), 0u64..4, any::<bool>(), any::<bool>()).prop_map(
            |(primary, head_lsn, consistent, discarding_local)| Side {
                role: if primary {
                    Role::Primary
                } else {
                    Role::Secondary
                },
                head_lsn,
                consistent,
                discarding_local,
                name_rank: 0,
            },
        )
    }

    fn arb_decision() -> impl Strategy<Value = Decision> {
        (0u8..8, 0u64..4).prop_map(|(tag, common_lsn)| match tag {
            0 => Decision::Same,
            1 => Decision::LocalAhead {
                common_generation: 1,
                common_lsn,
            },
            2 => Decision::RemoteAhead {
                common_generation: 1,
                common_lsn,
            },
            3 => Decision::SplitBrain {
                common_generation: 1,
                common_lsn,
            },
            4 => Decision::Unrelated,
            5 => Decision::LocalEmpty,
            6 => Decision::RemoteEmpty,
            _ => Decision::BothPrimary,
        })
    }

    proptest! {
        /// Whatever the inputs, the two sides' plans fit together: one ships exactly what the
        /// other receives, both see the split brain, and a secondary never ships.
        #[test]
        fn plans_mirror(decision in arb_decision(), a in arb_side(), b in arb_side()) {
            let (a, b) = (Side { name_rank: 0, ..a }, Side { name_rank: 1, ..b });
            let ours = plan(decision, &a, &b);
            let theirs = plan(decision.mirror(), &b, &a);
            if let Some(expected) = mirror(ours) {
                prop_assert_eq!(theirs, expected, "{:?} {:?} {:?}", decision, a, b);
            }
            if let Some(expected) = mirror(theirs) {
                prop_assert_eq!(ours, expected, "{:?} {:?} {:?}", decision, a, b);
            }
            if matches!(ours, Plan::Ship { .. }) {
                prop_assert_eq!(a.role, Role::Primary);
                prop_assert_eq!(b.role, Role::Secondary);
            }
            if ours == Plan::Demote {
                prop_assert_eq!(a.role, Role::Primary);
            }
        }
    }

    #[test]
    fn the_table() {
        let side = |role, head_lsn| Side {
            role,
            head_lsn,
            consistent: true,
            discarding_local: false,
            name_rank: 0,
        };
        let p = side(Role::Primary, 10);
        let s = side(Role::Secondary, 10);
        assert_eq!(
            plan(Decision::Same, &p, &s),
            Plan::Ship {
                resync: false,
                full: false,
                from_lsn: 10
            }
        );
        // A secondary beyond its primary (the primary lost its tail to a power loss) rolls
        // back to the primary's head and the blocks either side changed are resynced.
        let ahead = side(Role::Secondary, 14);
        assert_eq!(
            plan(Decision::Same, &p, &ahead),
            Plan::Ship {
                resync: true,
                full: false,
                from_lsn: 10
            }
        );
        assert_eq!(plan(Decision::Same, &s, &s), Plan::Idle);
        let split = Decision::SplitBrain {
            common_generation: 1,
            common_lsn: 5,
        };
        assert_eq!(plan(split, &p, &s), Plan::SplitBrain { common_lsn: 5 });
        let victim = Side {
            discarding_local: true,
            ..s
        };
        assert_eq!(
            plan(split, &p, &victim),
            Plan::Ship {
                resync: true,
                full: false,
                from_lsn: 5
            }
        );
        let remote_ahead = Decision::RemoteAhead {
            common_generation: 1,
            common_lsn: 5,
        };
        assert_eq!(plan(remote_ahead, &p, &s), Plan::Demote);
        assert_eq!(plan(Decision::RemoteEmpty, &s, &s), Plan::Idle);
    }
}
