//! The database: a registry keyspace plus one keyspace per agent.
//!
//! Keys inside an agent's keyspace: `approval/<id>` and `audit/<seq as 8 big-endian bytes>`,
//! so an agent's audit trail is read in order by a prefix scan.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fjall::config::PinningPolicy;
use fjall::{
    AbstractTree, Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode,
};
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::approval::{ApprovalFilter, ApprovalRecord, ApprovalState, Settlement};
use crate::audit::{verify_chain, AuditRecord, ChainHead, ChainReport};
use crate::now_millis;

const REGISTRY: &str = "agents";
const AGENT_PREFIX: &str = "agent.";
/// Every agent's approval records, keyed by the agent's id, a zero byte and the approval's
/// id. Not in the agent's own keyspace, for the reason [`AUDIT_HEADS`] is not: an approval
/// written among the audit records would put its table's key range over the whole trail.
const APPROVALS: &str = "approvals";
/// Where an agent's approvals were kept before [`APPROVALS`], in the agent's keyspace: moved
/// from there when the store opens.
const LEGACY_APPROVAL_KEY: &[u8] = b"approval/";
const AUDIT_KEY: &[u8] = b"audit/";
/// Where each agent's audit chain ends: one key per agent id. Not in the agent's own
/// keyspace: a key written with every batch of records there would put every table's key
/// range over all the others' (the records' keys only grow), so each compaction would
/// rewrite the whole trail instead of moving its tables down untouched.
const AUDIT_HEADS: &str = "audit-heads";
/// Where an agent's chain head was kept before [`AUDIT_HEADS`], in the agent's keyspace:
/// still read, and removed at the agent's next append or prune.
const LEGACY_AUDIT_HEAD_KEY: &[u8] = b"audit-head";
/// A keyspace for the store's own records: when the database was last opened, written
/// durably at every open to prove the disk takes writes.
const HEALTH: &str = "health";
const OPENED_AT_KEY: &[u8] = b"opened-at";

// Memory bounds. fjall's defaults (64 MiB memtable per keyspace, 32 MiB block cache) suit a
// database that is the process's main job; here the store sits beside a proxy, with one
// keyspace per agent, and its reads (approvals, audit pages) are rare.
/// Capacity of the block cache that every keyspace's reads share.
const BLOCK_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// fjall's background threads (flushes and compactions): one. With more (its default is one
/// per core, up to 4), worker 0 leaves compactions to the others by sending each back to the
/// queue and taking it again, a spin for as long as another worker compacts: 12% of the audit
/// bench's CPU. The audit trail's tables do not overlap (its keys only grow), so its
/// compactions move tables down without rewriting them, and a flush waits little behind one.
/// Measured: 14% less CPU per audit record (docs/benchmarks.md, "The audit trail's writes").
const FJALL_WORKERS: usize = 1;
/// A keyspace's memtable is flushed to disk at this size.
const MEMTABLE_BYTES: u64 = 4 * 1024 * 1024;
/// Audit records deleted per write when pruning (a few MiB of keys at most).
const PRUNE_CHUNK: usize = 10_000;

/// Options for every keyspace (fjall stores them with the keyspace when it is created).
///
/// Nothing is pinned in memory: fjall's default keeps the index blocks of level-0 and
/// level-1 tables, and the filters of level-0 tables, in memory for as long as the table is
/// open, and a table keeps what it pinned when compaction moves it down whole, which is what
/// happens to an audit trail's tables (its keys only ever grow). Pinned memory then grew with
/// the trail, about 0.45 % of the audit data written (1.5 MiB a minute in the soak run).
/// Unpinned, index and filter blocks are read through the bounded block cache instead; the
/// store's reads (approvals, audit pages) are rare enough not to notice.
fn keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .max_memtable_size(MEMTABLE_BYTES)
        .index_block_pinning_policy(PinningPolicy::all(false))
        .filter_block_pinning_policy(PinningPolicy::all(false))
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (disk, permissions, corruption).
    #[error("the store at {path} failed: {reason}{hint}", hint = database_hint(reason))]
    Database {
        /// The database directory.
        path: PathBuf,
        /// What fjall reported.
        reason: fjall::Error,
    },
    /// A stored record could not be read back.
    #[error("a stored {what} record is unreadable: {reason}")]
    Corrupt {
        /// Which kind of record, e.g. `approval` or `agent`.
        what: &'static str,
        /// What serde reported.
        reason: serde_json::Error,
    },
    /// The store is closed because a write failed, and opening it again has not yet
    /// succeeded (the disk is still full or read-only).
    #[error("the store at {path} is closed after a failed write ({failure}); it reopens by itself once the disk takes writes again")]
    Reopening {
        /// The database directory.
        path: PathBuf,
        /// Why the write failed.
        failure: String,
    },
    /// A reopen gave up waiting for operations still using the old database.
    #[error(
        "the store at {0} could not be reopened: operations were still using it; it is tried again"
    )]
    Busy(PathBuf),
    /// No approval has this id.
    #[error("no approval {0:?}")]
    NoApproval(String),
    /// The approval was already settled; settlements never change.
    #[error("approval {id:?} is already {state}", state = state.as_str())]
    AlreadySettled {
        /// The approval's id.
        id: String,
        /// The state it was settled to before.
        state: ApprovalState,
    },
    /// A settlement must leave `Pending`.
    #[error("an approval cannot be settled back to pending")]
    StillPending,
    /// The agent has no data here (it was never registered, or was removed).
    #[error("agent {0:?} has no stored data")]
    NoAgent(String),
}

/// What an operator can do about a database failure, for the kinds that say.
fn database_hint(reason: &fjall::Error) -> &'static str {
    use std::io::ErrorKind;
    match reason {
        fjall::Error::Locked => " (is another gateway using this data directory?)",
        fjall::Error::Io(e) if e.kind() == ErrorKind::ReadOnlyFilesystem => {
            " (the data directory is read-only; the gateway must be able to write there)"
        }
        fjall::Error::Io(e) if e.kind() == ErrorKind::StorageFull => {
            " (the disk holding the data directory is full)"
        }
        fjall::Error::Poisoned => {
            " (an earlier write failed; the store reopens by itself once the disk is writable)"
        }
        _ => "",
    }
}

/// The store's memory, in bytes, by what it is for (see [`Store::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreMemory {
    /// Memtables: writes not yet flushed to tables (each keyspace's is bounded).
    pub write_buffer: u64,
    /// Blocks cached for reads (bounded by the cache's capacity).
    pub block_cache: u64,
    /// Index and filter blocks kept in memory for the tables of the upper levels.
    pub pinned: u64,
    /// Tables on disk, over all keyspaces (not memory, but what `pinned` grows with).
    pub tables: u64,
}

/// One agent's keyspace, and the next position in its audit trail.
struct AgentSpace {
    /// The agent's id (the key of its chain head).
    agent: String,
    keyspace: Keyspace,
    /// Where the agent's audit chain ends (also stored, in [`AUDIT_HEADS`]).
    head: Mutex<ChainHead>,
    /// Whether the head is still stored the old way, in the agent's keyspace: the next
    /// write of the head removes that copy.
    legacy_head: std::sync::atomic::AtomicBool,
}

/// The gateway's durable state. Cheap to share: clone the `Arc` it comes in.
pub struct Store {
    path: PathBuf,
    /// The open database; `None` only while [`Store::reopen`] replaces it.
    open: RwLock<Option<Arc<Opened>>>,
    /// Agents removed by this process: audit records still on their way for them are
    /// dropped instead of bringing a removed agent's keyspace back.
    removed: RwLock<std::collections::HashSet<String>>,
    /// One audit appender (or verifier) at a time.
    appending: Mutex<()>,
    /// Serializes read-modify-write of approval records: a settlement checks `Pending` and
    /// writes its outcome as one step, so an approval and an expiry cannot both win.
    settling: Mutex<()>,
    /// Why a write failed, once one has: fjall refuses every later write (it cannot know
    /// what reached the disk) until the database is opened again ([`Store::reopen`]).
    write_failure: Mutex<Option<String>>,
    /// Writes that failed since the store was opened.
    write_errors: std::sync::atomic::AtomicU64,
}

/// The open fjall database and what is read from it at open. Every store operation holds
/// one for its whole length, so a reopen knows when the old database is no longer used.
struct Opened {
    path: PathBuf,
    db: Database,
    registry: Keyspace,
    /// Every agent's audit chain head ([`AUDIT_HEADS`]).
    heads: Keyspace,
    /// Every agent's approval records ([`APPROVALS`]).
    approvals: Keyspace,
    agents: RwLock<HashMap<String, Arc<AgentSpace>>>,
    /// Approval id → agent id, rebuilt at open, so an approval is found by its id alone.
    approval_owner: RwLock<HashMap<String, String>>,
}

impl Opened {
    /// Opens (or creates) the database in `path` and proves it writable with a durable
    /// write: a database that can only be read is refused here, not at the first request.
    fn load(path: &Path) -> Result<Opened, StoreError> {
        let err = |reason| database_error(path, reason);
        let db = Database::builder(path)
            .cache_size(BLOCK_CACHE_BYTES)
            .worker_threads(FJALL_WORKERS)
            .open()
            .map_err(err)?;
        let registry = db.keyspace(REGISTRY, keyspace_options).map_err(err)?;
        let heads = db.keyspace(AUDIT_HEADS, keyspace_options).map_err(err)?;
        let approvals = db.keyspace(APPROVALS, keyspace_options).map_err(err)?;
        let health = db.keyspace(HEALTH, keyspace_options).map_err(err)?;
        let mut proof = db.batch().durability(Some(PersistMode::SyncData));
        proof.insert(&health, OPENED_AT_KEY, now_millis().to_be_bytes());
        proof.commit().map_err(err)?;
        let opened = Opened {
            path: path.to_path_buf(),
            db,
            registry,
            heads,
            approvals,
            agents: RwLock::default(),
            approval_owner: RwLock::default(),
        };
        for name in opened.db.list_keyspace_names() {
            let Some(agent) = name.strip_prefix(AGENT_PREFIX) else {
                continue;
            };
            let space = opened.open_space(agent)?;
            opened.move_legacy_approvals(&space)?;
        }
        for record in scan::<ApprovalRecord>(&opened.approvals, b"", "approval")
            .map_err(|e| scan_error(path, e))?
        {
            opened
                .approval_owner
                .write()
                .insert(record.id, record.agent);
        }
        opened.forget_orphan_heads().map_err(err)?;
        Ok(opened)
    }

    /// Moves the approvals an earlier gateway kept in the agent's own keyspace to
    /// [`APPROVALS`], in one durable write.
    fn move_legacy_approvals(&self, space: &AgentSpace) -> Result<(), StoreError> {
        let legacy: Vec<ApprovalRecord> = scan(&space.keyspace, LEGACY_APPROVAL_KEY, "approval")
            .map_err(|e| scan_error(&self.path, e))?;
        if legacy.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for record in &legacy {
            let value = approval_json(record)?;
            batch.insert(
                &self.approvals,
                approval_key(&space.agent, &record.id),
                value,
            );
            batch.remove(
                &space.keyspace,
                [LEGACY_APPROVAL_KEY, record.id.as_bytes()].concat(),
            );
        }
        batch.commit().map_err(|e| self.db_err(e))
    }

    /// Removes the chain heads of agents that have no keyspace: a removal that stopped
    /// between dropping the agent's keyspace and its head. A later agent of the same id
    /// must start a chain of its own.
    fn forget_orphan_heads(&self) -> Result<(), fjall::Error> {
        let agents = self.agents.read();
        let mut batch = self.db.batch();
        for item in self.heads.iter() {
            let key = item.key()?;
            if !agents.contains_key(String::from_utf8_lossy(&key).as_ref()) {
                batch.remove(&self.heads, key);
            }
        }
        if !batch.is_empty() {
            batch.commit()?;
        }
        Ok(())
    }

    fn db_err(&self, reason: fjall::Error) -> StoreError {
        database_error(&self.path, reason)
    }

    fn open_space(&self, agent: &str) -> Result<Arc<AgentSpace>, StoreError> {
        if let Some(space) = self.agents.read().get(agent) {
            return Ok(space.clone());
        }
        let mut agents = self.agents.write();
        if let Some(space) = agents.get(agent) {
            return Ok(space.clone());
        }
        let keyspace = self
            .db
            .keyspace(&format!("{AGENT_PREFIX}{agent}"), keyspace_options)
            .map_err(|e| self.db_err(e))?;
        let (head, legacy) = self.read_head(agent, &keyspace)?;
        let space = Arc::new(AgentSpace {
            agent: agent.to_string(),
            keyspace,
            head: Mutex::new(head),
            legacy_head: legacy.into(),
        });
        agents.insert(agent.to_string(), space.clone());
        Ok(space)
    }

    /// The agent's stored chain head, and whether it was found where it was kept before
    /// [`AUDIT_HEADS`] (in the agent's keyspace).
    fn read_head(&self, agent: &str, keyspace: &Keyspace) -> Result<(ChainHead, bool), StoreError> {
        let parse = |value: &[u8]| {
            serde_json::from_slice(value).map_err(|reason| StoreError::Corrupt {
                what: "audit head",
                reason,
            })
        };
        if let Some(value) = self.heads.get(agent).map_err(|e| self.db_err(e))? {
            return Ok((parse(&value)?, false));
        }
        match keyspace
            .get(LEGACY_AUDIT_HEAD_KEY)
            .map_err(|e| self.db_err(e))?
        {
            Some(value) => Ok((parse(&value)?, true)),
            None => Ok((ChainHead::default(), false)),
        }
    }

    /// Puts `space`'s chain head (`head`) in `batch`, and the removal of its old copy if the
    /// agent still has one.
    fn write_head(
        &self,
        batch: &mut OwnedWriteBatch,
        space: &AgentSpace,
        head: &ChainHead,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(head).map_err(|reason| StoreError::Corrupt {
            what: "audit head",
            reason,
        })?;
        batch.insert(&self.heads, space.agent.as_str(), value);
        if space.legacy_head.load(Ordering::Relaxed) {
            batch.remove(&space.keyspace, LEGACY_AUDIT_HEAD_KEY);
        }
        Ok(())
    }

    /// After a batch with `space`'s head failed, takes the head back from the disk.
    fn restore_head(&self, space: &AgentSpace, head: &mut ChainHead) {
        if let Ok((stored, legacy)) = self.read_head(&space.agent, &space.keyspace) {
            *head = stored;
            space.legacy_head.store(legacy, Ordering::Relaxed);
        }
    }

    fn existing_space(&self, agent: &str) -> Option<Arc<AgentSpace>> {
        self.agents.read().get(agent).cloned()
    }

    fn all_spaces(&self) -> Vec<Arc<AgentSpace>> {
        self.agents.read().values().cloned().collect()
    }
}

fn database_error(path: &Path, reason: fjall::Error) -> StoreError {
    StoreError::Database {
        path: path.to_path_buf(),
        reason,
    }
}

fn scan_error(path: &Path, e: ScanError) -> StoreError {
    match e {
        ScanError::Db(reason) => database_error(path, reason),
        ScanError::Corrupt(what, reason) => StoreError::Corrupt { what, reason },
    }
}

/// How long a reopen waits for operations still using the old database.
const REOPEN_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Store {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path) -> Result<Arc<Store>, StoreError> {
        let opened = Opened::load(path)?;
        Ok(Arc::new(Store {
            path: path.to_path_buf(),
            open: RwLock::new(Some(Arc::new(opened))),
            removed: RwLock::default(),
            appending: Mutex::new(()),
            settling: Mutex::new(()),
            write_failure: Mutex::new(None),
            write_errors: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The open database, for one operation.
    fn opened(&self) -> Result<Arc<Opened>, StoreError> {
        self.open
            .read()
            .clone()
            .ok_or_else(|| StoreError::Reopening {
                path: self.path.clone(),
                failure: self.write_failure().unwrap_or_default(),
            })
    }

    /// After a failed write (disk full, read-only, I/O error), closes the database and opens
    /// it again, so the gateway recovers by itself once the disk is writable: what reached
    /// the disk is recovered from its journal, as at a restart, and the audit chains go on
    /// from their stored heads. Returns `Ok(false)` when no write has failed (nothing to
    /// do), `Ok(true)` once writes work again, and the error while they do not (then the
    /// store stays closed and every operation fails until a later call succeeds).
    pub fn reopen(&self) -> Result<bool, StoreError> {
        if self.write_failure().is_none() {
            return Ok(false);
        }
        let mut slot = self.open.write();
        if let Some(mut old) = slot.take() {
            // fjall allows one open database per directory: operations that began before
            // the reopen finish first (new ones wait on `slot`).
            let deadline = std::time::Instant::now() + REOPEN_DRAIN;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(opened) => {
                        drop(opened);
                        break;
                    }
                    Err(still_used) if std::time::Instant::now() < deadline => {
                        old = still_used;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(still_used) => {
                        *slot = Some(still_used);
                        return Err(StoreError::Busy(self.path.clone()));
                    }
                }
            }
        }
        let opened = Opened::load(&self.path)?;
        *slot = Some(Arc::new(opened));
        *self.write_failure.lock() = None;
        Ok(true)
    }

    fn with_path(&self, e: ScanError) -> StoreError {
        scan_error(&self.path, e)
    }

    fn db_err(&self, reason: fjall::Error) -> StoreError {
        database_error(&self.path, reason)
    }

    /// The error for a failed write, remembered: after it the store takes no more writes
    /// until [`Store::reopen`].
    fn write_err(&self, reason: fjall::Error) -> StoreError {
        self.write_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut failure = self.write_failure.lock();
        if failure.is_none() {
            *failure = Some(reason.to_string());
        }
        self.db_err(reason)
    }

    /// Why the store can no longer write (disk full, read-only, I/O error), if a write has
    /// failed. fjall refuses every write after a failed one, so this stays set until
    /// [`Store::reopen`] succeeds.
    pub fn write_failure(&self) -> Option<String> {
        self.write_failure.lock().clone()
    }

    /// How many writes failed since the store was opened.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the store holds in memory now, by kind: for operators (a gauge each) and for the
    /// soak run, which tells the store's share of the gateway's memory from the rest.
    pub fn memory(&self) -> StoreMemory {
        let Ok(open) = self.opened() else {
            return StoreMemory::default();
        };
        let mut trees = vec![
            open.registry.tree.clone(),
            open.heads.tree.clone(),
            open.approvals.tree.clone(),
        ];
        trees.extend(
            open.all_spaces()
                .iter()
                .map(|space| space.keyspace.tree.clone()),
        );
        StoreMemory {
            write_buffer: open.db.write_buffer_size(),
            block_cache: open.db.cache_size(),
            pinned: trees
                .iter()
                .map(|tree| (tree.pinned_filter_size() + tree.pinned_block_index_size()) as u64)
                .sum(),
            tables: trees.iter().map(|tree| tree.table_count() as u64).sum(),
        }
    }

    /// Writes (`Some`) or removes (`None`) one key, fsync'd before returning.
    fn commit_durably(
        &self,
        open: &Opened,
        keyspace: &Keyspace,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let mut batch = open.db.batch().durability(Some(PersistMode::SyncData));
        match value {
            Some(value) => batch.insert(keyspace, key, value),
            None => batch.remove(keyspace, key),
        }
        batch.commit().map_err(|e| self.write_err(e))
    }

    // ---- agent registry ----

    /// Stores (or replaces) an agent's registry record, durably. The record is the caller's
    /// own type: the store only keeps it.
    pub fn put_agent<T: Serialize>(&self, id: &str, agent: &T) -> Result<(), StoreError> {
        let value = serde_json::to_vec(agent).map_err(|reason| StoreError::Corrupt {
            what: "agent",
            reason,
        })?;
        let open = self.opened()?;
        open.open_space(id)?;
        self.removed.write().remove(id);
        self.commit_durably(&open, &open.registry, id.as_bytes().to_vec(), Some(value))
    }

    /// Every stored agent record.
    pub fn agents<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        scan(&self.opened()?.registry, b"", "agent").map_err(|e| self.with_path(e))
    }

    /// Removes an agent's registry record and all of its data (approvals, audit trail).
    pub fn remove_agent(&self, id: &str) -> Result<(), StoreError> {
        let open = self.opened()?;
        // No audit append (which could bring the keyspace or the head back) and no rewrite of
        // an approval (which could bring it back) while the agent's data goes.
        let _in_order = self.appending.lock();
        let _one_at_a_time = self.settling.lock();
        let mut batch = open.db.batch().durability(Some(PersistMode::SyncData));
        batch.remove(&open.registry, id);
        for item in open.approvals.prefix(agent_approvals(id)) {
            batch.remove(&open.approvals, item.key().map_err(|e| self.db_err(e))?);
        }
        batch.commit().map_err(|e| self.write_err(e))?;
        open.approval_owner.write().retain(|_, owner| owner != id);
        self.removed.write().insert(id.to_string());
        let space = open.agents.write().remove(id);
        if let Some(space) = space {
            open.db
                .delete_keyspace(space.keyspace.clone())
                .map_err(|e| self.write_err(e))?;
        }
        // After the keyspace: a head left by a crash in between is forgotten at the next
        // open, and a keyspace never outlives its head.
        let mut batch = open.db.batch();
        batch.remove(&open.heads, id);
        batch.commit().map_err(|e| self.write_err(e))
    }

    /// Whether the agent has a keyspace of its own (for tests of the layout).
    pub fn has_agent_space(&self, id: &str) -> bool {
        self.opened()
            .is_ok_and(|open| open.db.keyspace_exists(&format!("{AGENT_PREFIX}{id}")))
    }

    // ---- approvals ----

    /// Stores a new approval record, durably: the request may be held only once this returns.
    pub fn insert_approval(&self, record: &ApprovalRecord) -> Result<(), StoreError> {
        let open = self.opened()?;
        self.write_approval(&open, record)?;
        open.approval_owner
            .write()
            .insert(record.id.clone(), record.agent.clone());
        Ok(())
    }

    fn write_approval(&self, open: &Opened, record: &ApprovalRecord) -> Result<(), StoreError> {
        let key = approval_key(&record.agent, &record.id);
        self.commit_durably(open, &open.approvals, key, Some(approval_json(record)?))
    }

    /// The approval with this id, whichever agent's it is; `None` if no stored record has it.
    pub fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        let open = self.opened()?;
        let Some(agent) = open.approval_owner.read().get(id).cloned() else {
            return Ok(None);
        };
        read_approval(&open.approvals, &agent, id).map_err(|e| self.with_path(e))
    }

    /// Approvals matching `filter`, oldest request first.
    pub fn approvals(&self, filter: &ApprovalFilter) -> Result<Vec<ApprovalRecord>, StoreError> {
        let open = self.opened()?;
        let prefix = filter
            .agent
            .as_deref()
            .map(agent_approvals)
            .unwrap_or_default();
        let mut found: Vec<ApprovalRecord> = scan(&open.approvals, &prefix, "approval")
            .map_err(|e| self.with_path(e))?
            .into_iter()
            .filter(|r| filter.matches(r))
            .collect();
        found.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        Ok(found)
    }

    /// Moves a pending approval to its final state, durably, and returns the settled record.
    /// Fails with [`StoreError::AlreadySettled`] if something else settled it first.
    pub fn settle(&self, id: &str, settlement: Settlement) -> Result<ApprovalRecord, StoreError> {
        if settlement.state == ApprovalState::Pending {
            return Err(StoreError::StillPending);
        }
        let _one_at_a_time = self.settling.lock();
        let open = self.opened()?;
        let mut record = self.stored_approval(&open, id)?;
        if record.state != ApprovalState::Pending {
            return Err(StoreError::AlreadySettled {
                id: id.to_string(),
                state: record.state,
            });
        }
        record.state = settlement.state;
        record.decided_at = Some(now_millis());
        record.approver = settlement.approver;
        record.reason = settlement.reason;
        if let Some(sealed) = settlement.sealed_obo_token {
            record.sealed_obo_token = Some(sealed);
        }
        self.write_approval(&open, &record)?;
        Ok(record)
    }

    /// The approval with this id.
    fn stored_approval(&self, open: &Opened, id: &str) -> Result<ApprovalRecord, StoreError> {
        let missing = || StoreError::NoApproval(id.to_string());
        let agent = open
            .approval_owner
            .read()
            .get(id)
            .cloned()
            .ok_or_else(missing)?;
        read_approval(&open.approvals, &agent, id)
            .map_err(|e| self.with_path(e))?
            .ok_or_else(missing)
    }

    /// Records on an approved request why it was not sent after all (`not_sent`): the
    /// decision at its release no longer allowed it. Once; the approval itself stands.
    pub fn not_sent(&self, id: &str, why: &str) -> Result<ApprovalRecord, StoreError> {
        let _one_at_a_time = self.settling.lock();
        let open = self.opened()?;
        let mut record = self.stored_approval(&open, id)?;
        if record.state != ApprovalState::Approved || record.not_sent.is_some() {
            return Err(StoreError::AlreadySettled {
                id: id.to_string(),
                state: record.state,
            });
        }
        record.not_sent = Some(why.to_string());
        self.write_approval(&open, &record)?;
        Ok(record)
    }

    /// Marks every pending approval abandoned: called at start, when no held connection can
    /// have survived the previous process. Returns how many there were.
    pub fn abandon_all_pending(&self) -> Result<usize, StoreError> {
        let pending = self.approvals(&ApprovalFilter {
            agent: None,
            state: Some(ApprovalState::Pending),
        })?;
        let mut abandoned = 0;
        for record in pending {
            match self.settle(&record.id, Settlement::by_gateway(ApprovalState::Abandoned)) {
                Ok(_) => abandoned += 1,
                Err(StoreError::AlreadySettled { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(abandoned)
    }

    /// Deletes the sealed on-behalf-of tokens of approvals that match `forget` (e.g. those of
    /// a tool call that ended, or past their lifetime), of one agent or (`None`) of all.
    /// Returns how many were deleted.
    pub fn forget_obo_tokens(
        &self,
        agent: Option<&str>,
        forget: impl Fn(&ApprovalRecord) -> bool,
    ) -> Result<usize, StoreError> {
        let open = self.opened()?;
        let prefix = agent.map(agent_approvals).unwrap_or_default();
        let _one_at_a_time = self.settling.lock();
        let records: Vec<ApprovalRecord> =
            scan(&open.approvals, &prefix, "approval").map_err(|e| self.with_path(e))?;
        let mut forgotten = 0;
        for mut record in records {
            if record.sealed_obo_token.is_some() && forget(&record) {
                record.sealed_obo_token = None;
                self.write_approval(&open, &record)?;
                forgotten += 1;
            }
        }
        Ok(forgotten)
    }

    // ---- audit ----

    /// Appends records (of any agents) to their audit trails in one write, creating agents'
    /// keyspaces as needed. Not fsync'd: the audit trail trades the last moments before a
    /// power loss for request latency.
    pub fn append_audit_batch(&self, records: Vec<AuditRecord>) -> Result<(), StoreError> {
        // One appender at a time: each record links to the one before it.
        let _in_order = self.appending.lock();
        let open = self.opened()?;
        let mut batch = open.db.batch();
        let mut touched: Vec<Arc<AgentSpace>> = Vec::new();
        for mut record in records {
            if self.removed.read().contains(&record.agent) {
                continue;
            }
            let space = open.open_space(&record.agent)?;
            let mut head = space.head.lock();
            record.seq = head.next_seq;
            let value = record.seal(std::mem::take(&mut head.hash));
            head.next_seq += 1;
            head.hash = record.hash.clone();
            drop(head);
            batch.insert(&space.keyspace, audit_key(record.seq), value);
            if !touched.iter().any(|t| Arc::ptr_eq(t, &space)) {
                touched.push(space);
            }
        }
        for space in &touched {
            open.write_head(&mut batch, space, &space.head.lock())?;
        }
        if let Err(e) = batch.commit() {
            // Nothing was written: the chains end where the stored heads say.
            for space in &touched {
                open.restore_head(space, &mut space.head.lock());
            }
            return Err(self.write_err(e));
        }
        for space in &touched {
            space.legacy_head.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Checks an agent's audit chain and reports the first broken link.
    pub fn verify_audit(&self, agent: &str) -> Result<ChainReport, StoreError> {
        let open = self.opened()?;
        let space = open
            .existing_space(agent)
            .ok_or_else(|| StoreError::NoAgent(agent.to_string()))?;
        let _in_order = self.appending.lock();
        let head = space.head.lock().clone();
        // One record at a time: a trail can be far larger than memory.
        let mut failure = None;
        let records = records::<AuditRecord>(&space.keyspace, AUDIT_KEY, "audit")
            .map_while(|record| record.map_err(|e| failure = Some(e)).ok());
        let report = verify_chain(records, &head);
        match failure {
            Some(e) => Err(self.with_path(e)),
            None => Ok(report),
        }
    }

    /// An agent's audit records from position `since` on, at most `limit` of them.
    pub fn audit(
        &self,
        agent: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let open = self.opened()?;
        let space = open
            .existing_space(agent)
            .ok_or_else(|| StoreError::NoAgent(agent.to_string()))?;
        let mut records = Vec::new();
        for item in space
            .keyspace
            .range(audit_key(since)..audit_key(u64::MAX))
            .take(limit)
        {
            let value = item.value().map_err(|e| self.db_err(e))?;
            records.push(
                serde_json::from_slice(&value).map_err(|reason| StoreError::Corrupt {
                    what: "audit",
                    reason,
                })?,
            );
        }
        Ok(records)
    }

    /// Deletes audit records, and settled approvals, older than `before` (ms since the epoch).
    /// Returns how many records were deleted.
    pub fn prune(&self, before: u64) -> Result<usize, StoreError> {
        let open = self.opened()?;
        let mut pruned = 0;
        for space in open.all_spaces() {
            while let Some(deleted) = self.prune_audit_chunk(&open, &space, before)? {
                pruned += deleted;
            }
        }
        let _one_at_a_time = self.settling.lock();
        let approvals: Vec<ApprovalRecord> =
            scan(&open.approvals, b"", "approval").map_err(|e| self.with_path(e))?;
        let old: Vec<ApprovalRecord> = approvals
            .into_iter()
            .filter(|r| {
                r.state != ApprovalState::Pending && r.decided_at.is_some_and(|at| at < before)
            })
            .collect();
        if !old.is_empty() {
            // One durable write for all of them: settlements wait on this lock meanwhile.
            let mut batch = open.db.batch().durability(Some(PersistMode::SyncData));
            for record in &old {
                batch.remove(&open.approvals, approval_key(&record.agent, &record.id));
            }
            batch.commit().map_err(|e| self.write_err(e))?;
            let mut owners = open.approval_owner.write();
            for record in &old {
                owners.remove(&record.id);
            }
        }
        Ok(pruned + old.len())
    }

    /// Deletes the oldest audit records of one agent older than `before`, at most
    /// [`PRUNE_CHUNK`] of them, with the chain head moved past them in the same write.
    /// Returns how many were deleted, or `None` when there are no more to delete. In chunks,
    /// so that pruning a long trail neither holds it in memory nor holds up appenders.
    fn prune_audit_chunk(
        &self,
        open: &Opened,
        space: &AgentSpace,
        before: u64,
    ) -> Result<Option<usize>, StoreError> {
        let _in_order = self.appending.lock();
        let first_kept = space.head.lock().pruned_before;
        let mut batch = open.db.batch();
        let mut last_pruned = None;
        let mut deleted = 0;
        let oldest = space
            .keyspace
            .range(audit_key(first_kept)..audit_key(u64::MAX))
            .take(PRUNE_CHUNK);
        for item in oldest {
            let (key, value) = item.into_inner().map_err(|e| self.db_err(e))?;
            let record: AuditRecord =
                serde_json::from_slice(&value).map_err(|reason| StoreError::Corrupt {
                    what: "audit",
                    reason,
                })?;
            if record.at >= before {
                break;
            }
            batch.remove(&space.keyspace, key);
            last_pruned = Some(record.seq);
            deleted += 1;
        }
        let Some(last_pruned) = last_pruned else {
            return Ok(None);
        };
        // The chain now starts later, on purpose: verification starts there.
        let mut head = space.head.lock();
        head.pruned_before = last_pruned + 1;
        open.write_head(&mut batch, space, &head)?;
        if let Err(e) = batch.commit() {
            open.restore_head(space, &mut head);
            return Err(self.write_err(e));
        }
        space.legacy_head.store(false, Ordering::Relaxed);
        Ok(Some(deleted))
    }
}

/// The key of an agent's approval in [`APPROVALS`].
fn approval_key(agent: &str, id: &str) -> Vec<u8> {
    [&agent_approvals(agent), id.as_bytes()].concat()
}

/// The prefix of every key of the agent's approvals: its id and a zero byte (which no id
/// holds, so one agent's prefix never starts another's).
fn agent_approvals(agent: &str) -> Vec<u8> {
    [agent.as_bytes(), &[0]].concat()
}

fn approval_json(record: &ApprovalRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|reason| StoreError::Corrupt {
        what: "approval",
        reason,
    })
}

fn audit_key(seq: u64) -> Vec<u8> {
    [AUDIT_KEY, &seq.to_be_bytes()].concat()
}

enum ScanError {
    Db(fjall::Error),
    Corrupt(&'static str, serde_json::Error),
}

/// The records under `prefix`, in key order, read one at a time.
fn records<'a, T: DeserializeOwned>(
    keyspace: &'a Keyspace,
    prefix: &'a [u8],
    what: &'static str,
) -> impl Iterator<Item = Result<T, ScanError>> + 'a {
    keyspace.prefix(prefix).map(move |item| {
        let value = item.value().map_err(ScanError::Db)?;
        serde_json::from_slice(&value).map_err(|e| ScanError::Corrupt(what, e))
    })
}

/// The records under `prefix`, in key order, all in memory: for the small sets (agents,
/// approvals); audit trails are read with [`records`].
fn scan<T: DeserializeOwned>(
    keyspace: &Keyspace,
    prefix: &[u8],
    what: &'static str,
) -> Result<Vec<T>, ScanError> {
    records(keyspace, prefix, what).collect()
}

fn read_approval(
    keyspace: &Keyspace,
    agent: &str,
    id: &str,
) -> Result<Option<ApprovalRecord>, ScanError> {
    match keyspace
        .get(approval_key(agent, id))
        .map_err(ScanError::Db)?
    {
        Some(value) => serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| ScanError::Corrupt("approval", e)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::ApprovalKind;

    #[test]
    fn an_approval_stored_before_it_named_its_session_and_run_mode_still_reads() {
        let mut old = serde_json::to_value(pending("a1", "agent")).expect("json");
        let fields = old.as_object_mut().expect("object");
        assert!(fields.remove("run_mode").is_some());
        assert!(!fields.contains_key("session"), "no session: not written");
        let read: ApprovalRecord = serde_json::from_value(old).expect("an older record reads");
        assert_eq!((read.session, read.run_mode), (None, None));
    }

    fn pending(id: &str, agent: &str) -> ApprovalRecord {
        ApprovalRecord {
            id: id.into(),
            agent: agent.into(),
            tool_call: Some("tc-1".into()),
            session: None,
            run_mode: Some("Review".into()),
            command: None,
            kind: ApprovalKind::Request,
            method: "POST".into(),
            url: "https://api.example.com/things".into(),
            body_sha256: "00".repeat(32),
            body_bytes: 0,
            credential: None,
            policies: vec!["review-approved-writes".into()],
            requested_at: now_millis(),
            expires_at: now_millis() + 600_000,
            state: ApprovalState::Pending,
            decided_at: None,
            approver: None,
            reason: None,
            sealed_obo_token: None,
            obo_audience: None,
            not_sent: None,
        }
    }

    fn audit(agent: &str, at: u64) -> AuditRecord {
        crate::audit::example(agent, at)
    }

    #[test]
    fn a_settlement_is_final_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_agent("a1", &"record").unwrap();
            store.insert_approval(&pending("ap1", "a1")).unwrap();
            let settled = store
                .settle(
                    "ap1",
                    Settlement {
                        state: ApprovalState::Approved,
                        approver: Some("alice".into()),
                        reason: None,
                        sealed_obo_token: None,
                    },
                )
                .unwrap();
            assert_eq!(settled.state, ApprovalState::Approved);
            let again = store.settle("ap1", Settlement::by_gateway(ApprovalState::Expired));
            assert!(matches!(
                again,
                Err(StoreError::AlreadySettled {
                    state: ApprovalState::Approved,
                    ..
                })
            ));
        }
        let store = Store::open(dir.path()).unwrap();
        let record = store.approval("ap1").unwrap().unwrap();
        assert_eq!(record.state, ApprovalState::Approved);
        assert_eq!(record.approver.as_deref(), Some("alice"));
        assert_eq!(
            store.agents::<String>().unwrap(),
            vec!["record".to_string()]
        );
    }

    #[test]
    fn agents_live_in_separate_keyspaces_and_removal_drops_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_agent("a1", &1).unwrap();
        store.put_agent("a2", &2).unwrap();
        store.insert_approval(&pending("x", "a1")).unwrap();
        store.insert_approval(&pending("y", "a2")).unwrap();
        store.append_audit_batch(vec![audit("a1", 1)]).unwrap();
        assert!(store.has_agent_space("a1") && store.has_agent_space("a2"));
        let only_a2 = store
            .approvals(&ApprovalFilter {
                agent: Some("a2".into()),
                state: None,
            })
            .unwrap();
        assert_eq!(only_a2.len(), 1);
        assert_eq!(only_a2[0].id, "y");

        store.remove_agent("a1").unwrap();
        assert!(!store.has_agent_space("a1"));
        // A record still on its way for a removed agent does not bring its keyspace back.
        store.append_audit_batch(vec![audit("a1", 3)]).unwrap();
        assert!(!store.has_agent_space("a1"));
        assert!(store.approval("x").unwrap().is_none());
        assert!(store.approval("y").unwrap().is_some());
        assert_eq!(store.agents::<i32>().unwrap(), vec![2]);
        assert!(matches!(
            store.audit("a1", 0, 10),
            Err(StoreError::NoAgent(_))
        ));
    }

    #[test]
    fn an_approved_request_not_sent_after_all_says_why_once_and_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_approval(&pending("p1", "a1")).unwrap();
            // Only an approved request can be not sent.
            assert!(matches!(
                store.not_sent("p1", "why"),
                Err(StoreError::AlreadySettled { .. })
            ));
            let approved = Settlement {
                state: ApprovalState::Approved,
                approver: Some("ann".into()),
                reason: None,
                sealed_obo_token: None,
            };
            store.settle("p1", approved).unwrap();
            let record = store.not_sent("p1", "policy reloaded").unwrap();
            assert_eq!(record.state, ApprovalState::Approved);
            assert!(matches!(
                store.not_sent("p1", "again"),
                Err(StoreError::AlreadySettled { .. })
            ));
            assert!(matches!(
                store.not_sent("nope", "why"),
                Err(StoreError::NoApproval(_))
            ));
        }
        let store = Store::open(dir.path()).unwrap();
        let record = store.approval("p1").unwrap().unwrap();
        assert_eq!(record.not_sent.as_deref(), Some("policy reloaded"));
        assert_eq!(record.approver.as_deref(), Some("ann"));
    }

    #[test]
    fn pending_approvals_are_abandoned_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_approval(&pending("p1", "a1")).unwrap();
        store.insert_approval(&pending("p2", "a1")).unwrap();
        store
            .settle("p2", Settlement::by_gateway(ApprovalState::Expired))
            .unwrap();
        assert_eq!(store.abandon_all_pending().unwrap(), 1);
        assert_eq!(
            store.approval("p1").unwrap().unwrap().state,
            ApprovalState::Abandoned
        );
        assert_eq!(
            store.approval("p2").unwrap().unwrap().state,
            ApprovalState::Expired
        );
    }

    #[test]
    fn audit_trail_is_ordered_resumes_after_reopen_and_is_pruned_by_age() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_agent("a1", &1).unwrap();
            for at in [10, 20, 30] {
                store.append_audit_batch(vec![audit("a1", at)]).unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap();
        store.append_audit_batch(vec![audit("a1", 40)]).unwrap();
        let all = store.audit("a1", 0, 100).unwrap();
        assert_eq!(
            all.iter().map(|r| (r.seq, r.at)).collect::<Vec<_>>(),
            vec![(0, 10), (1, 20), (2, 30), (3, 40)]
        );
        assert_eq!(store.audit("a1", 2, 1).unwrap()[0].at, 30);
        assert_eq!(store.prune(25).unwrap(), 2);
        let left = store.audit("a1", 0, 100).unwrap();
        assert_eq!(left.iter().map(|r| r.at).collect::<Vec<_>>(), vec![30, 40]);
    }

    /// An agent's stored audit trail, its raw keyspace (to tamper with) and the store.
    fn trail(records: u64) -> (tempfile::TempDir, Arc<Store>, Keyspace) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let batch = (0..records).map(|at| audit("a1", at * 10)).collect();
        store.append_audit_batch(batch).unwrap();
        let keyspace = store
            .opened()
            .unwrap()
            .existing_space("a1")
            .unwrap()
            .keyspace
            .clone();
        (dir, store, keyspace)
    }

    #[test]
    fn an_untouched_chain_verifies_also_after_reopening_and_pruning() {
        let (dir, store, _) = trail(5);
        let report = store.verify_audit("a1").unwrap();
        assert_eq!((report.records, report.broken), (5, None));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.append_audit_batch(vec![audit("a1", 100)]).unwrap();
        assert_eq!(store.verify_audit("a1").unwrap().broken, None);
        assert_eq!(store.prune(25).unwrap(), 3);
        let report = store.verify_audit("a1").unwrap();
        assert_eq!(
            (report.records, report.first_seq, report.broken),
            (3, Some(3), None)
        );
        assert_eq!(store.prune(1000).unwrap(), 3);
        assert_eq!(store.verify_audit("a1").unwrap().broken, None);
    }

    #[test]
    fn a_trail_longer_than_a_prune_chunk_is_pruned_in_chunks_and_still_verifies() {
        let records = 2 * PRUNE_CHUNK as u64 + 7;
        let (_dir, store, _) = trail(records);
        // Records are at 0, 10, 20…: everything before the last 5 goes.
        let before = (records - 5) * 10;
        assert_eq!(store.prune(before).unwrap(), records as usize - 5);
        let left = store.audit("a1", 0, 100).unwrap();
        assert_eq!(
            left.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (records - 5..records).collect::<Vec<_>>()
        );
        let report = store.verify_audit("a1").unwrap();
        assert_eq!((report.records, report.broken), (5, None));
        assert_eq!(store.prune(before).unwrap(), 0);
    }

    #[test]
    fn a_failed_store_is_reopened_in_place_and_goes_on_where_the_disk_says() {
        let (_dir, store, _) = trail(3);
        let record = pending("ap-1", "a1");
        store.insert_approval(&record).unwrap();
        assert!(!store.reopen().unwrap(), "nothing failed: nothing to do");
        // A write failed (as on a full disk): the store says so until it is reopened.
        *store.write_failure.lock() = Some("No space left on device".into());
        let reader = store.opened().unwrap();
        // An operation still under way holds the old database: the reopen waits for it.
        let held = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(reader);
        });
        assert!(store.reopen().unwrap());
        held.join().unwrap();
        assert_eq!(store.write_failure(), None);
        // The same data, the approvals found by id, the chain going on from its head.
        assert_eq!(
            store.approval("ap-1").unwrap().unwrap().state,
            ApprovalState::Pending
        );
        store.append_audit_batch(vec![audit("a1", 100)]).unwrap();
        let report = store.verify_audit("a1").unwrap();
        assert_eq!((report.records, report.broken), (4, None));
    }

    #[test]
    fn an_agents_keyspace_holds_only_its_records_whose_keys_only_grow() {
        let (_dir, store, keyspace) = trail(3);
        store.insert_approval(&pending("ap-1", "a1")).unwrap();
        store.append_audit_batch(vec![audit("a1", 100)]).unwrap();
        let keys: Vec<Vec<u8>> = keyspace
            .iter()
            .map(|kv| kv.key().unwrap().to_vec())
            .collect();
        // Nothing rewritten with every batch: each flushed table's keys start after the
        // last one's end, so compaction moves tables down instead of merging them.
        assert_eq!(keys, (0..4).map(audit_key).collect::<Vec<_>>());
        let heads = &store.opened().unwrap().heads;
        let head: ChainHead = serde_json::from_slice(&heads.get("a1").unwrap().unwrap()).unwrap();
        assert_eq!(head.next_seq, 4);
    }

    #[test]
    fn a_chain_head_kept_the_old_way_is_read_and_moved_at_the_next_write() {
        let (dir, store, keyspace) = trail(3);
        // The layout before the heads had a keyspace of their own.
        let heads = store.opened().unwrap().heads.clone();
        let head = heads.get("a1").unwrap().unwrap();
        keyspace.insert(LEGACY_AUDIT_HEAD_KEY, head).unwrap();
        heads.remove("a1").unwrap();
        drop((store, keyspace, heads));

        let store = Store::open(dir.path()).unwrap();
        let report = store.verify_audit("a1").unwrap();
        assert_eq!((report.records, report.broken), (3, None));
        store.append_audit_batch(vec![audit("a1", 100)]).unwrap();
        let open = store.opened().unwrap();
        let space = open.existing_space("a1").unwrap();
        assert!(space.keyspace.get(LEGACY_AUDIT_HEAD_KEY).unwrap().is_none());
        assert!(open.heads.get("a1").unwrap().is_some());
        drop((space, open));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.append_audit_batch(vec![audit("a1", 110)]).unwrap();
        let report = store.verify_audit("a1").unwrap();
        assert_eq!((report.records, report.broken), (5, None));
    }

    #[test]
    fn approvals_kept_the_old_way_are_moved_at_open_and_read_as_before() {
        let (dir, store, keyspace) = trail(2);
        let record = pending("ap-old", "a1");
        let legacy_key = [LEGACY_APPROVAL_KEY, b"ap-old"].concat();
        keyspace
            .insert(legacy_key.clone(), serde_json::to_vec(&record).unwrap())
            .unwrap();
        drop((store, keyspace));

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.approval("ap-old").unwrap(), Some(record));
        let open = store.opened().unwrap();
        let space = open.existing_space("a1").unwrap();
        assert!(space.keyspace.get(&legacy_key).unwrap().is_none());
        drop((space, open));
        let settled = store.settle("ap-old", Settlement::by_gateway(ApprovalState::Expired));
        assert_eq!(settled.unwrap().state, ApprovalState::Expired);
        let listed = store
            .approvals(&ApprovalFilter {
                agent: Some("a1".into()),
                state: None,
            })
            .unwrap();
        assert_eq!(listed.len(), 1);
    }

    #[test]
    fn a_removed_agents_head_goes_with_it_and_an_agent_of_its_name_starts_afresh() {
        let (dir, store, _) = trail(3);
        store.insert_approval(&pending("ap-1", "a1")).unwrap();
        store.insert_approval(&pending("ap-2", "a10")).unwrap();
        store.remove_agent("a1").unwrap();
        assert!(store.opened().unwrap().heads.get("a1").unwrap().is_none());
        // A head left behind by a removal that stopped half-way is forgotten at open.
        let heads = store.opened().unwrap().heads.clone();
        heads
            .insert("ghost", serde_json::to_vec(&ChainHead::default()).unwrap())
            .unwrap();
        drop((store, heads));
        let store = Store::open(dir.path()).unwrap();
        assert!(store
            .opened()
            .unwrap()
            .heads
            .get("ghost")
            .unwrap()
            .is_none());
        // Its approvals went with it, and only its: not those of an agent whose id it begins.
        let all = store.approvals(&ApprovalFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["ap-2"]
        );
        store.put_agent("a1", &1).unwrap();
        store.append_audit_batch(vec![audit("a1", 200)]).unwrap();
        assert_eq!(store.audit("a1", 0, 10).unwrap()[0].seq, 0);
        let report = store.verify_audit("a1").unwrap();
        assert_eq!((report.records, report.broken), (1, None));
    }

    #[test]
    fn nothing_of_a_growing_trail_is_pinned_in_memory() {
        let (_dir, store, keyspace) = trail(1000);
        keyspace.rotate_memtable_and_wait().unwrap();
        let more = (0..1000).map(|at| audit("a1", 10_000 + at)).collect();
        store.append_audit_batch(more).unwrap();
        keyspace.rotate_memtable_and_wait().unwrap();
        let memory = store.memory();
        assert!(memory.tables >= 2, "{memory:?}");
        // fjall's default pins every new table's index and filter (its level 0).
        assert_eq!(memory.pinned, 0, "{memory:?}");
    }

    #[test]
    fn an_edited_record_is_found() {
        let (_dir, store, keyspace) = trail(5);
        let mut record = store.audit("a1", 2, 1).unwrap().remove(0);
        record.status = 500;
        keyspace
            .insert(audit_key(2), serde_json::to_vec(&record).unwrap())
            .unwrap();
        let broken = store.verify_audit("a1").unwrap().broken.unwrap();
        assert_eq!(broken.seq, 2);
        assert!(broken.reason.contains("edited"), "{}", broken.reason);

        // Re-hashing the edited record does not help: the next one's link breaks.
        record.hash = record.expected_hash();
        keyspace
            .insert(audit_key(2), serde_json::to_vec(&record).unwrap())
            .unwrap();
        let broken = store.verify_audit("a1").unwrap().broken.unwrap();
        assert_eq!(broken.seq, 3);
        assert!(broken.reason.contains("prev_hash"), "{}", broken.reason);
    }

    #[test]
    fn deleted_records_are_found_in_the_middle_and_at_the_end() {
        let (_dir, store, keyspace) = trail(5);
        keyspace.remove(audit_key(1)).unwrap();
        let broken = store.verify_audit("a1").unwrap().broken.unwrap();
        assert_eq!(broken.seq, 1);
        assert!(broken.reason.contains("missing"), "{}", broken.reason);

        let (_dir, store, keyspace) = trail(5);
        keyspace.remove(audit_key(4)).unwrap();
        keyspace.remove(audit_key(3)).unwrap();
        let broken = store.verify_audit("a1").unwrap().broken.unwrap();
        assert_eq!(broken.seq, 3);
        assert!(
            broken.reason.contains("3 to 4 are missing"),
            "{}",
            broken.reason
        );
    }

    #[test]
    fn obo_tokens_are_forgotten_selectively() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_approval(&pending("o1", "a1")).unwrap();
        store
            .settle(
                "o1",
                Settlement {
                    state: ApprovalState::Approved,
                    approver: Some("bob".into()),
                    reason: None,
                    sealed_obo_token: Some(vec![1, 2, 3]),
                },
            )
            .unwrap();
        assert_eq!(
            store.approval("o1").unwrap().unwrap().sealed_obo_token,
            Some(vec![1, 2, 3])
        );
        assert_eq!(
            store
                .forget_obo_tokens(Some("a1"), |r| r.tool_call.as_deref() == Some("other"))
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .forget_obo_tokens(Some("a1"), |r| r.tool_call.as_deref() == Some("tc-1"))
                .unwrap(),
            1
        );
        assert_eq!(
            store.approval("o1").unwrap().unwrap().sealed_obo_token,
            None
        );
    }
}
