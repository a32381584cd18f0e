//! The same behaviour table, run against every backend: the [`Backend`] contract itself, and
//! the typed store's operations built on it.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::backend::{Backend, Conflict, Tree, Txn};
use super::*;

/// One instance of every backend, with the directory keeping the sled one alive (dropped
/// after the backend).
fn backends() -> Vec<(&'static str, Arc<dyn Backend>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sled: Arc<dyn Backend> = Arc::new(SledBackend::open(dir.path()).unwrap());
    vec![("sled", sled, Some(dir)), ("memory", Arc::new(MemoryBackend::new()), None)]
}

/// Runs `check` on a fresh store on every backend; `check` gets the backend's name for its
/// messages.
fn on_every_store(check: impl Fn(&str, &Store)) {
    for (name, backend, _dir) in backends() {
        check(name, &Store::with_backend(backend));
    }
}

fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
    (k.as_bytes().to_vec(), v.as_bytes().to_vec())
}

#[test]
fn backends_read_what_was_committed_in_key_order_per_tree() {
    for (name, b, _dir) in backends() {
        assert_eq!(b.last(Tree::HookSeen).unwrap(), None, "{name}");
        let txn = Txn::new()
            .put(Tree::HookSeen, b"b", b"2".to_vec())
            .put(Tree::HookSeen, b"a", b"1".to_vec())
            .put(Tree::HookSeen, b"c", b"3".to_vec());
        assert_eq!(b.commit(&txn).unwrap(), Ok(()), "{name}");
        assert_eq!(b.scan(Tree::HookSeen).unwrap(), vec![kv("a", "1"), kv("b", "2"), kv("c", "3")], "{name}");
        assert_eq!(b.last(Tree::HookSeen).unwrap(), Some(kv("c", "3")), "{name}");
        assert_eq!(b.get(Tree::HookSeen, b"b").unwrap(), Some(b"2".to_vec()), "{name}");
        // Trees are separate key spaces.
        assert_eq!(b.get(Tree::Freezes, b"b").unwrap(), None, "{name}");
        assert!(b.scan(Tree::Freezes).unwrap().is_empty(), "{name}");
        // Keys order bytewise, as big-endian sequence numbers need.
        let seqs = [255u64, 1, 256];
        for s in seqs {
            b.commit(&Txn::new().put(Tree::Audit, &s.to_be_bytes(), vec![])).unwrap().unwrap();
        }
        let last = b.last(Tree::Audit).unwrap().map(|(k, _)| k);
        assert_eq!(last, Some(256u64.to_be_bytes().to_vec()), "{name}");
        // A delete, and a later write to the same key winning.
        let txn = Txn::new().delete(Tree::HookSeen, b"c").put(Tree::HookSeen, b"a", b"x".to_vec()).put(
            Tree::HookSeen,
            b"a",
            b"y".to_vec(),
        );
        b.commit(&txn).unwrap().unwrap();
        assert_eq!(b.scan(Tree::HookSeen).unwrap(), vec![kv("a", "y"), kv("b", "2")], "{name}");
        let first = b.generate_id().unwrap();
        assert!(b.generate_id().unwrap() > first, "{name}");
        b.flush().unwrap();
    }
}

#[test]
fn backends_apply_a_transaction_entirely_or_not_at_all_across_trees() {
    for (name, b, _dir) in backends() {
        b.commit(&Txn::new().put(Tree::Tokens, b"t", b"fresh".to_vec())).unwrap().unwrap();
        let enrol = |token: &[u8]| {
            Txn::new()
                .compare(Tree::Tokens, b"t", Some(token))
                .compare(Tree::Agents, b"a1", None)
                .put(Tree::Tokens, b"t", b"used".to_vec())
                .put(Tree::Agents, b"a1", b"agent".to_vec())
                .put(Tree::Meta, b"n", b"1".to_vec())
        };
        // One compare of three fails (a value that differs): no tree changes.
        assert_eq!(b.commit(&enrol(b"stale")).unwrap(), Err(Conflict), "{name}");
        assert_eq!(b.get(Tree::Tokens, b"t").unwrap(), Some(b"fresh".to_vec()), "{name}");
        assert_eq!(b.get(Tree::Agents, b"a1").unwrap(), None, "{name}");
        assert_eq!(b.get(Tree::Meta, b"n").unwrap(), None, "{name}");
        // All hold: every tree changes.
        assert_eq!(b.commit(&enrol(b"fresh")).unwrap(), Ok(()), "{name}");
        assert_eq!(b.get(Tree::Tokens, b"t").unwrap(), Some(b"used".to_vec()), "{name}");
        assert_eq!(b.get(Tree::Agents, b"a1").unwrap(), Some(b"agent".to_vec()), "{name}");
        assert_eq!(b.get(Tree::Meta, b"n").unwrap(), Some(b"1".to_vec()), "{name}");
        // "Absent" fails on a present key; a present value fails on an absent key.
        let absent = Txn::new().compare(Tree::Agents, b"a1", None).delete(Tree::Agents, b"a1");
        assert_eq!(b.commit(&absent).unwrap(), Err(Conflict), "{name}");
        let present = Txn::new().compare(Tree::Agents, b"a2", Some(b"agent")).delete(Tree::Meta, b"n");
        assert_eq!(b.commit(&present).unwrap(), Err(Conflict), "{name}");
        assert_eq!(b.get(Tree::Agents, b"a1").unwrap(), Some(b"agent".to_vec()), "{name}");
        assert_eq!(b.get(Tree::Meta, b"n").unwrap(), Some(b"1".to_vec()), "{name}");
        // A compare-and-delete of one key.
        let delete = Txn::new().compare(Tree::Agents, b"a1", Some(b"agent")).delete(Tree::Agents, b"a1");
        assert_eq!(b.commit(&delete).unwrap(), Ok(()), "{name}");
        assert_eq!(b.get(Tree::Agents, b"a1").unwrap(), None, "{name}");
        // An empty transaction, and compares alone, change nothing.
        assert_eq!(b.commit(&Txn::new()).unwrap(), Ok(()), "{name}");
        assert_eq!(b.commit(&Txn::new().compare(Tree::Meta, b"n", Some(b"1"))).unwrap(), Ok(()), "{name}");
        assert_eq!(b.commit(&Txn::new().compare(Tree::Meta, b"n", None)).unwrap(), Err(Conflict), "{name}");
    }
}

/// Two counters in two trees, each moved by read, compute, compare-and-write, retry: a lost
/// update or a torn transaction shows as a wrong count or counters that differ.
#[test]
fn backends_compare_and_write_loses_no_concurrent_update() {
    const THREADS: u64 = 8;
    const EACH: u64 = 40;
    for (name, b, _dir) in backends() {
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                let b = b.clone();
                scope.spawn(move || {
                    for _ in 0..EACH {
                        loop {
                            let raw = b.get(Tree::Meta, b"count").unwrap();
                            let n = raw.as_deref().and_then(be_u64).unwrap_or(0) + 1;
                            let txn = Txn::new()
                                .compare(Tree::Meta, b"count", raw.as_deref())
                                .put(Tree::Meta, b"count", n.to_be_bytes().to_vec())
                                .put(Tree::HookSeen, b"mirror", n.to_be_bytes().to_vec());
                            if b.commit(&txn).unwrap().is_ok() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        let total = (THREADS * EACH).to_be_bytes().to_vec();
        assert_eq!(b.get(Tree::Meta, b"count").unwrap(), Some(total.clone()), "{name}");
        assert_eq!(b.get(Tree::HookSeen, b"mirror").unwrap(), Some(total), "{name}");
    }
}

#[test]
fn backends_generate_unique_ids_concurrently() {
    for (name, b, _dir) in backends() {
        let ids: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let b = b.clone();
                    scope.spawn(move || (0..100).map(|_| b.generate_id().unwrap()).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "{name}");
    }
}

#[test]
fn jumps_of_the_order_numbering_are_bounded_in_total() {
    on_every_store(|name, store| {
        let first = store.reserve_seq(16).unwrap();
        assert_eq!(first, (1, 17), "{name}");
        // Reports below what is reserved move nothing and use none of the budget.
        assert_eq!(store.reserve_seq_after(5, 16, 100).unwrap(), Some((17, 33)), "{name}");
        // Jumps count against the total: 60 + 40 fit in 100, one more does not.
        assert_eq!(store.reserve_seq_after(92, 16, 100).unwrap(), Some((93, 109)), "{name}");
        assert_eq!(store.reserve_seq_after(148, 16, 100).unwrap(), Some((149, 165)), "{name}");
        assert_eq!(store.reserve_seq_after(166, 16, 100).unwrap(), None, "{name}");
        assert_eq!(store.seq_reserved().unwrap(), 165, "{name}: a refused jump changes nothing");
    });
}

#[test]
fn concurrent_reservations_get_disjoint_blocks() {
    on_every_store(|name, store| {
        let blocks: Vec<(u64, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8u64)
                .map(|i| {
                    scope.spawn(move || {
                        (0..10u64)
                            .map(|j| {
                                if (i + j) % 2 == 0 {
                                    store.reserve_seq(4).unwrap()
                                } else {
                                    store.reserve_seq_after(0, 4, 0).unwrap().unwrap()
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut blocks = blocks;
        blocks.sort_unstable();
        let mut next = 1;
        for (old, new) in blocks {
            assert_eq!((old, new), (next, next + 4), "{name}");
            next = new;
        }
        assert_eq!(store.seq_reserved().unwrap(), 1 + 8 * 10 * 4, "{name}");
    });
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Rec {
    at: i64,
}

#[test]
fn generic_records_round_trip() {
    on_every_store(|name, s| {
        s.put(Tree::HookSeen, "k1", &Rec { at: 5 }, true).unwrap();
        s.put(Tree::HookSeen, "k0", &Rec { at: 4 }, false).unwrap();
        assert_eq!(s.get::<Rec>(Tree::HookSeen, "k1").unwrap(), Some(Rec { at: 5 }), "{name}");
        assert_eq!(s.get::<Rec>(Tree::HookSeen, "k2").unwrap(), None, "{name}");
        let listed = s.list::<Rec>(Tree::HookSeen).unwrap();
        assert_eq!(
            listed,
            vec![("k0".to_string(), Rec { at: 4 }), ("k1".to_string(), Rec { at: 5 })],
            "{name}"
        );
        assert_eq!(s.last::<Rec>(Tree::HookSeen).unwrap(), Some(("k1".to_string(), Rec { at: 5 })), "{name}");
        assert!(s.remove(Tree::HookSeen, "k1").unwrap(), "{name}");
        assert!(!s.remove(Tree::HookSeen, "k1").unwrap(), "{name}");
        s.put_garbage_for_test("freezes", "bad").unwrap();
        assert!(matches!(s.get::<Rec>(Tree::Freezes, "bad"), Err(Error::Corrupt { .. })), "{name}");
        assert!(s.list::<Rec>(Tree::Freezes).is_err(), "{name}");
    });
}

#[test]
fn generic_records_survive_reopening_the_sled_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.put(Tree::HookSeen, "k1", &Rec { at: 5 }, true).unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.list::<Rec>(Tree::HookSeen).unwrap(), vec![("k1".to_string(), Rec { at: 5 })]);
}

/// What the sled backend writes is what earlier builds wrote: the same tree names, keys and
/// value encodings, so existing stores open and stores written now open in earlier builds.
#[test]
fn the_sled_layout_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.reserve_seq(16).unwrap();
        s.append_audit::<Rec>(|_| (1, Rec { at: 7 })).unwrap();
        s.put(Tree::Rollouts, "ro-1", &Rec { at: 3 }, true).unwrap();
        s.put_token(b"\x00hash", &token()).unwrap();
        s.commit_enrollment(b"\x00hash", &agent("a-1")).unwrap().unwrap();
    }
    let db = retry_open(dir.path());
    let tree = |name: &str| db.open_tree(name).unwrap();
    assert_eq!(tree("meta").get("seq_reserved").unwrap().as_deref(), Some(&17u64.to_be_bytes()[..]));
    let audit = tree("audit").get(1u64.to_be_bytes()).unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&audit).unwrap(),
        serde_json::json!({"v": 1, "at": 7})
    );
    assert!(tree("rollouts").get("ro-1").unwrap().is_some());
    let tok: serde_json::Value =
        serde_json::from_slice(&tree("tokens").get(b"\x00hash").unwrap().unwrap()).unwrap();
    assert_eq!(tok["used_by"], "a-1");
    assert!(tree("agents").get("a-1").unwrap().is_some());
}

/// Opens the sled database in `dir` once the store's handle has let go of it.
fn retry_open(dir: &std::path::Path) -> ::sled::Db {
    convoy_base::files::retry_while_busy(LOCK_WAIT, || ::sled::open(dir), sled_locked).unwrap()
}

#[test]
fn insert_if_absent_lets_exactly_one_concurrent_caller_win() {
    on_every_store(|name, s| {
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    scope.spawn(move || {
                        s.insert_if_absent(Tree::HookSeen, "delivery", &Rec { at: i }).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(wins, 1, "{name}");
        assert!(!s.insert_if_absent(Tree::HookSeen, "delivery", &Rec { at: 99 }).unwrap(), "{name}");
        assert_ne!(s.get::<Rec>(Tree::HookSeen, "delivery").unwrap(), Some(Rec { at: 99 }), "{name}");
    });
}

#[test]
fn removing_concurrently_reports_one_removal() {
    on_every_store(|name, s| {
        s.put(Tree::Desired, "d", &Rec { at: 1 }, false).unwrap();
        let removed: usize = std::thread::scope(|scope| {
            let handles: Vec<_> =
                (0..8).map(|_| scope.spawn(|| s.remove(Tree::Desired, "d").unwrap())).collect();
            handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(removed, 1, "{name}");
    });
}

fn token() -> TokenRecord {
    TokenRecord {
        region: Some("eu".into()),
        labels: BTreeMap::new(),
        allow_agent_labels: false,
        created_at: 1,
        expires_at: 2,
        created_by: "admin/test".into(),
        used_by: None,
        environment: Default::default(),
    }
}

fn agent(id: &str) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        region: "eu".into(),
        labels: BTreeMap::new(),
        first_seen: 1,
        last_seen: 0,
        cert_serial: "01".into(),
        cert_not_after: 2,
        agent_version: "1.0.0".into(),
        releases: Vec::new(),
        revoked: false,
        apps: Vec::new(),
        previous_serial: None,
        previous_serial_until: 0,
        cert_serial_used: false,
        environment: Default::default(),
    }
}

#[test]
fn enrollment_uses_the_token_once_and_never_reuses_an_id() {
    on_every_store(|name, s| {
        assert!(matches!(s.commit_enrollment(b"h1", &agent("a-1")).unwrap(), Err(EnrollConflict::TokenGone)));
        s.put_token(b"h1", &token()).unwrap();
        s.put_token(b"h2", &token()).unwrap();
        s.commit_enrollment(b"h1", &agent("a-1")).unwrap().unwrap();
        assert_eq!(s.token(b"h1").unwrap().unwrap().used_by.as_deref(), Some("a-1"), "{name}");
        assert_eq!(s.agent("a-1").unwrap().unwrap().id, "a-1", "{name}");
        let reused = s.commit_enrollment(b"h1", &agent("a-2")).unwrap();
        assert!(matches!(reused, Err(EnrollConflict::TokenUsed)), "{name}: {reused:?}");
        let taken = s.commit_enrollment(b"h2", &agent("a-1")).unwrap();
        assert!(matches!(taken, Err(EnrollConflict::AgentExists)), "{name}: {taken:?}");
        assert_eq!(
            s.token(b"h2").unwrap().unwrap().used_by,
            None,
            "{name}: a refused enrollment changes nothing"
        );
        assert_eq!(s.agent("a-2").unwrap().map(|a| a.id), None, "{name}");
        // A token that is no record any more reads as gone.
        s.write(Txn::new().put(Tree::Tokens, b"h3", b"garbage".to_vec())).unwrap();
        let garbled = s.commit_enrollment(b"h3", &agent("a-3")).unwrap();
        assert!(matches!(garbled, Err(EnrollConflict::TokenGone)), "{name}: {garbled:?}");
    });
}

#[test]
fn concurrent_enrollments_with_one_token_enrol_one_agent() {
    on_every_store(|name, s| {
        s.put_token(b"h", &token()).unwrap();
        let outcomes: Vec<Result<(), EnrollConflict>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| scope.spawn(move || s.commit_enrollment(b"h", &agent(&format!("a-{i}"))).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{name}: {outcomes:?}");
        assert!(outcomes.iter().all(|o| matches!(o, Ok(()) | Err(EnrollConflict::TokenUsed))), "{name}");
        let agents = s.agents().unwrap();
        assert_eq!(agents.len(), 1, "{name}");
        assert_eq!(s.token(b"h").unwrap().unwrap().used_by, Some(agents[0].id.clone()), "{name}");
    });
}

#[test]
fn agent_updates_are_atomic_and_lose_nothing() {
    on_every_store(|name, s| {
        assert!(s.update_agent("nobody", true, |_| panic!("no record to apply to")).unwrap().is_none());
        s.put_agent_for_test(&agent("a-1")).unwrap();
        std::thread::scope(|scope| {
            for i in 0..8 {
                scope.spawn(move || {
                    for _ in 0..25 {
                        let new = s.update_agent("a-1", i % 2 == 0, |r| r.last_seen += 1).unwrap().unwrap();
                        assert!(new.last_seen >= 1);
                    }
                });
            }
        });
        assert_eq!(s.agent("a-1").unwrap().unwrap().last_seen, 200, "{name}");
        s.put_garbage_for_test("agents", "a-2").unwrap();
        assert!(matches!(s.update_agent("a-2", true, |_| {}), Err(Error::Corrupt { .. })), "{name}");
    });
}

fn release(version: &str, pushed_by: &str) -> ReleaseRecord {
    ReleaseRecord {
        app: "web".into(),
        version: version.into(),
        digest: "sha256:00".into(),
        size: 1,
        created_at: 1,
        pushed_at: 2,
        pushed_by: pushed_by.into(),
        signers: Vec::new(),
        unpacked_size: 1,
        files: 1,
    }
}

#[test]
fn a_release_is_inserted_once() {
    on_every_store(|name, s| {
        assert_eq!(s.insert_release(&release("1.0.0", "alice")).unwrap(), None, "{name}");
        let existing = s.insert_release(&release("1.0.0", "bob")).unwrap();
        assert_eq!(existing, Some(release("1.0.0", "alice")), "{name}");
        s.insert_release(&release("1.1.0", "bob")).unwrap();
        assert_eq!(s.releases().unwrap().len(), 2, "{name}");
        assert_eq!(s.release("web", "1.1.0").unwrap(), Some(release("1.1.0", "bob")), "{name}");
        s.remove_release("web", "1.1.0").unwrap();
        assert_eq!(s.release("web", "1.1.0").unwrap(), None, "{name}");
        assert_eq!(s.insert_release(&release("1.1.0", "carol")).unwrap(), None, "{name}");
    });
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    prev: u64,
}

#[test]
fn concurrent_audit_appends_form_one_unbroken_chain() {
    on_every_store(|name, s| {
        assert_eq!(s.audit_last_seq().unwrap(), None, "{name}");
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..10 {
                        s.append_audit::<Entry>(|last| {
                            let prev = last.map_or(0, |l| l.seq);
                            (prev + 1, Entry { seq: prev + 1, prev })
                        })
                        .unwrap();
                    }
                });
            }
        });
        let log = s.audit_raw().unwrap();
        assert_eq!(log.len(), 80, "{name}");
        for (i, (seq, entry)) in log.iter().enumerate() {
            let i = i as u64 + 1;
            assert_eq!((*seq, entry.clone()), (i, serde_json::json!({"seq": i, "prev": i - 1})), "{name}");
        }
        assert_eq!(s.audit_last_seq().unwrap(), Some(80), "{name}");
        assert_eq!(s.audit_at(3).unwrap(), Some(serde_json::json!({"seq": 3, "prev": 2})), "{name}");
        assert_eq!(s.audit_at(81).unwrap(), None, "{name}");
        // An append that would not come after the last entry is refused.
        let stale = s.append_audit::<Entry>(|_| (80, Entry { seq: 80, prev: 79 }));
        assert!(matches!(stale, Err(Error::AuditOrder { seq: 80, last: 80 })), "{name}: {stale:?}");
        // The test hook rewrites and removes entries as stored.
        let original = s.audit_bytes_for_tests(1).unwrap().unwrap();
        s.tamper_audit_for_tests(1, Some(b"{\"v\":1,\"seq\":1,\"prev\":7}")).unwrap();
        assert_eq!(s.audit_at(1).unwrap(), Some(serde_json::json!({"seq": 1, "prev": 7})), "{name}");
        s.tamper_audit_for_tests(1, Some(&original)).unwrap();
        assert_eq!(s.audit_bytes_for_tests(1).unwrap(), Some(original), "{name}");
        s.tamper_audit_for_tests(2, None).unwrap();
        assert_eq!(s.audit_at(2).unwrap(), None, "{name}");
        assert_eq!(s.audit_raw().unwrap().len(), 79, "{name}");
    });
}
