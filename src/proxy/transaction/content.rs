//! A filtered message as it stands: in memory, or in a spool file.
//!
//! Milters, hooks and shadows only read the message, so a small one needs no file: it is
//! kept in memory, which spares the file's creation, writes, reads and removal, each a
//! hand-off to the blocking pool (on a busy proxy these hand-offs, not the filters, were
//! most of the CPU a hook cost). The memory is bounded twice: a message is kept in memory
//! only up to [`MEMORY_MESSAGE_LIMIT`], and all such messages together only up to
//! `SpoolMemory` ([`MemoryBudget`], charged by the buffers' capacity); past either, the
//! message goes to a spool file as before. A live filter command reads a file, so with one
//! every message is spooled.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::spool::{self, Spool};

/// The largest message kept in memory; it is also the hooks' one-buffer limit, so a message
/// in memory is always sent to a hook whole, with a Content-Length.
pub(crate) const MEMORY_MESSAGE_LIMIT: usize = 256 * 1024;

/// Bytes of messages held in memory now, by every session.
static IN_MEMORY: AtomicU64 = AtomicU64::new(0);

/// A share of the process's `SpoolMemory`, given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct MemoryBudget {
    held: u64,
}

impl MemoryBudget {
    /// Takes `n` more bytes when the total stays within `limit`.
    pub(crate) fn grow(&mut self, n: u64, limit: u64) -> bool {
        let taken = IN_MEMORY.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(n).filter(|total| *total <= limit)
        });
        if taken.is_ok() {
            self.held += n;
            // Added and taken away, never set: sessions may report in any order.
            crate::ops::metrics::global().spool_memory_add(n as i64);
        }
        taken.is_ok()
    }
}

impl Drop for MemoryBudget {
    fn drop(&mut self) {
        if self.held > 0 {
            IN_MEMORY.fetch_sub(self.held, Ordering::AcqRel);
            crate::ops::metrics::global().spool_memory_add(-(self.held as i64));
        }
    }
}

/// A message held in memory with its share of `SpoolMemory`. A clone shares both, so the
/// share goes back only when the last holder is done with the bytes: the session, a shadow,
/// a reader, or a copy on its way to a file on the blocking pool (which cannot be
/// cancelled, and may outlive the session that started it).
#[derive(Clone)]
pub(crate) struct InMemory {
    bytes: Bytes,
    /// Held for its drop.
    _budget: Arc<MemoryBudget>,
}

impl AsRef<[u8]> for InMemory {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Bytes that charge nothing, for tests.
#[cfg(test)]
impl From<Bytes> for InMemory {
    fn from(bytes: Bytes) -> InMemory {
        InMemory {
            bytes,
            _budget: Arc::default(),
        }
    }
}

/// The message, in memory (with its share of the budget) or in a spool file.
pub(crate) enum Content {
    Memory(InMemory),
    File(Spool),
}

impl Content {
    /// Moves the message to a spool file (a filter command reads one), when it is in memory.
    pub(crate) async fn spooled(&mut self, dir: &Path) -> io::Result<&mut Spool> {
        if let Content::Memory(held) = self {
            let spool = Spool::one(dir).await?;
            let mut writer = spool.writer()?;
            writer.write(&held.bytes).await;
            writer.finish().await?;
            *self = Content::File(spool);
        }
        let Content::File(spool) = self else {
            unreachable!("a message in memory was moved to a file above");
        };
        Ok(spool)
    }

    /// Gives the message up, its spool file removed before this returns ([`Spool::remove`]).
    pub(crate) async fn remove(self) {
        if let Content::File(spool) = self {
            spool.remove().await;
        }
    }

    pub(crate) fn source(&self) -> Source<'_> {
        match self {
            Content::Memory(held) => Source::Memory(held),
            Content::File(spool) => Source::File(spool.path()),
        }
    }
}

/// Where a message can be read from.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    Memory(&'a InMemory),
    File(&'a Path),
}

impl Source<'_> {
    /// The message's size now (a filter may have changed the file); `otherwise` when the
    /// file cannot be looked at.
    pub(crate) async fn size(self, otherwise: u64) -> u64 {
        match self {
            Source::Memory(held) => held.bytes.len() as u64,
            Source::File(path) => tokio::fs::metadata(path)
                .await
                .map_or(otherwise, |m| m.len()),
        }
    }

    /// A copy of the message in a new file in `dir` (named `prefix`XXXXXX), for a reader
    /// that must have a file of its own.
    pub(crate) async fn copy_to_file(
        self,
        dir: &Path,
        prefix: &'static str,
    ) -> io::Result<spool::TempCopy> {
        let dir = dir.to_path_buf();
        let source = self.to_owned();
        spool::blocking(move || {
            let copy = tempfile::Builder::new()
                .prefix(prefix)
                .tempfile_in(&dir)?
                .into_temp_path();
            match source {
                OwnedSource::File(path) => {
                    std::fs::copy(&path, &copy)?;
                }
                OwnedSource::Memory(held) => std::fs::write(&copy, &held.bytes)?,
            }
            Ok(spool::TempCopy::new(copy))
        })
        .await?
    }

    /// Keeps a copy of the message as `dir/NAME.eml` with `record` (its envelope) as
    /// `dir/NAME.json`, both mode 0600; `dir` is created (mode 0700) if missing. The
    /// record is written last, under a temporary name renamed into place, so that a record
    /// present always has its message complete.
    pub(crate) async fn hold(self, dir: &Path, name: &str, record: String) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let source = self.to_owned();
        let (dir, name) = (dir.to_path_buf(), name.to_string());
        spool::blocking(move || -> io::Result<()> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let open = |p: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(p)
            };
            let mut eml = open(&dir.join(format!("{name}.eml")))?;
            match source {
                OwnedSource::Memory(held) => io::Write::write_all(&mut eml, &held.bytes)?,
                OwnedSource::File(path) => {
                    io::copy(&mut std::fs::File::open(path)?, &mut eml)?;
                }
            }
            eml.sync_all()?;
            let partial = dir.join(format!(".{name}.json"));
            let mut json = open(&partial)?;
            io::Write::write_all(&mut json, record.as_bytes())?;
            json.sync_all()?;
            std::fs::rename(&partial, dir.join(format!("{name}.json")))
        })
        .await?
    }

    /// The message as an owned source, for a reader that outlives the borrow.
    pub(crate) fn to_owned(self) -> OwnedSource {
        match self {
            Source::Memory(held) => OwnedSource::Memory(held.clone()),
            Source::File(path) => OwnedSource::File(path.to_path_buf()),
        }
    }
}

/// A [`Source`] that owns what it names (a clone of the bytes shares them, and their share
/// of the budget).
#[derive(Clone)]
pub(crate) enum OwnedSource {
    Memory(InMemory),
    File(PathBuf),
}

impl OwnedSource {
    pub(crate) fn source(&self) -> Source<'_> {
        match self {
            OwnedSource::Memory(held) => Source::Memory(held),
            OwnedSource::File(path) => Source::File(path),
        }
    }
}

/// Reads a message chunk by chunk: from memory in one piece, from a file through the
/// blocking pool ([`spool::Reader`]).
pub(crate) enum Reader {
    /// The bytes, and how many were handed out: at most [`spool::CHUNK`] at a time, as
    /// from a file, so that a reader's own buffers stay as small as with a file.
    Memory(InMemory, usize),
    File(spool::Reader),
}

impl Reader {
    pub(crate) async fn open(source: Source<'_>) -> io::Result<Reader> {
        Ok(match source {
            Source::Memory(held) => Reader::Memory(held.clone(), 0),
            Source::File(path) => Reader::File(spool::Reader::open(path).await?),
        })
    }

    /// The next bytes of the message; empty at its end.
    pub(crate) async fn next(&mut self) -> io::Result<&[u8]> {
        match self {
            Reader::Memory(held, at) => {
                let from = *at;
                *at = held.bytes.len().min(from + spool::CHUNK);
                Ok(&held.bytes[from..*at])
            }
            Reader::File(file) => file.next().await,
        }
    }
}

/// Where a message being received (from the client, or from a filter's changes) goes:
/// memory while it fits, then a spool file.
pub(crate) struct Receiving {
    memory: Vec<u8>,
    budget: MemoryBudget,
    limit: u64,
    dir: PathBuf,
    file: Option<(Spool, spool::Writer)>,
    error: Option<io::Error>,
}

impl Receiving {
    /// Receives into memory within `limit` bytes of `SpoolMemory` in all, else into a spool
    /// file in `dir`.
    pub(crate) fn new(limit: u64, dir: &Path) -> Receiving {
        Receiving {
            memory: Vec::new(),
            budget: MemoryBudget::default(),
            limit,
            dir: dir.to_path_buf(),
            file: None,
            error: None,
        }
    }

    /// Receives into `spool`, through `writer` (no memory: the directory is not used).
    pub(crate) fn into_file(spool: Spool, writer: spool::Writer) -> Receiving {
        let mut receiving = Receiving::new(0, Path::new(""));
        receiving.file = Some((spool, writer));
        receiving
    }

    /// Keeps nothing: the message could not be given a place (`finish` says why).
    pub(crate) fn failed(error: io::Error) -> Receiving {
        let mut receiving = Receiving::new(0, Path::new(""));
        receiving.error = Some(error);
        receiving
    }

    pub(crate) async fn write(&mut self, data: &[u8]) {
        if self.error.is_some() || data.is_empty() {
            return;
        }
        if self.file.is_none() {
            if self.make_room(data.len()) {
                self.memory.extend_from_slice(data);
                return;
            }
            // Too large for memory, or the budget is spent: on to a file, with what was
            // gathered so far. The memory goes back once it is written, not when the body
            // ends; the share of the budget with it, not before (the writes may wait for
            // a slow disk while the bytes are still held).
            let gathered = std::mem::take(&mut self.memory);
            let created = Spool::one(&self.dir).await;
            match created.and_then(|spool| Ok((spool.writer()?, spool))) {
                Ok((mut writer, spool)) => {
                    writer.write(&gathered).await;
                    self.file = Some((spool, writer));
                }
                Err(e) => self.error = Some(e),
            }
            drop(gathered);
            self.budget = MemoryBudget::default();
            if self.error.is_some() {
                return;
            }
        }
        if let Some((_, writer)) = &mut self.file {
            writer.write(data).await;
        }
    }

    /// Makes room for `more` bytes in memory, within the message's limit and the budget.
    /// The budget is charged for the buffer's capacity, not its length: that is what the
    /// process holds. The capacity doubles (as a Vec's would), up to the limit.
    fn make_room(&mut self, more: usize) -> bool {
        let needed = self.memory.len() + more;
        if needed > MEMORY_MESSAGE_LIMIT {
            return false;
        }
        let capacity = self.memory.capacity();
        if needed <= capacity {
            return true;
        }
        let grown = needed.max(2 * capacity).clamp(4096, MEMORY_MESSAGE_LIMIT);
        if !self.budget.grow((grown - capacity) as u64, self.limit) {
            return false;
        }
        self.memory.reserve_exact(grown - self.memory.len());
        true
    }

    /// The message received, or why it could not be kept.
    pub(crate) async fn finish(self) -> io::Result<Content> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.file {
            Some((spool, writer)) => {
                writer.finish().await?;
                Ok(Content::File(spool))
            }
            None => Ok(Content::Memory(InMemory {
                bytes: Bytes::from(self.memory),
                _budget: Arc::new(self.budget),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that charge the process-wide budget, or count on what it holds, take turns
    /// (the others keep nothing in memory).
    static BUDGET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn read_all(source: Source<'_>) -> Vec<u8> {
        let mut reader = Reader::open(source).await.unwrap();
        let mut all = Vec::new();
        loop {
            let chunk = reader.next().await.unwrap();
            if chunk.is_empty() {
                return all;
            }
            all.extend_from_slice(chunk);
        }
    }

    #[tokio::test]
    async fn small_messages_stay_in_memory_and_large_ones_go_to_a_file() {
        let _turn = BUDGET.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let table: [(usize, bool); 4] = [
            (0, true),
            (4096, true),
            (MEMORY_MESSAGE_LIMIT, true),
            (MEMORY_MESSAGE_LIMIT + 1, false),
        ];
        for (size, in_memory) in table {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut receiving = Receiving::new(u64::MAX, dir.path());
            for piece in data.chunks(1000) {
                receiving.write(piece).await;
            }
            let content = receiving.finish().await.unwrap();
            assert_eq!(
                matches!(content, Content::Memory(_)),
                in_memory,
                "{size} bytes"
            );
            assert_eq!(read_all(content.source()).await, data, "{size} bytes");
            assert_eq!(content.source().size(0).await, size as u64);
        }
    }

    #[tokio::test]
    async fn memory_is_charged_by_capacity_and_read_in_chunks() {
        let _turn = BUDGET.lock().await;
        let dir = tempfile::tempdir().unwrap();
        // Room for 16 KiB: a message of 10,000 bytes in 1,000-byte writes grows its buffer
        // 4, 8, 16 KiB and fits; the budget held is the 16 KiB of the buffer.
        let base = IN_MEMORY.load(Ordering::Acquire);
        let mut receiving = Receiving::new(base + 16 * 1024, dir.path());
        for _ in 0..10 {
            receiving.write(&[b'x'; 1000]).await;
        }
        let content = receiving.finish().await.unwrap();
        let Content::Memory(held) = &content else {
            panic!("not in memory");
        };
        assert_eq!(held._budget.held, 16 * 1024);
        // A message in memory is handed out as a file is: at most CHUNK bytes at a time.
        let big = InMemory::from(Bytes::from(vec![b'y'; 2 * spool::CHUNK + 5]));
        let mut reader = Reader::open(Source::Memory(&big)).await.unwrap();
        let mut sizes = Vec::new();
        loop {
            let n = reader.next().await.unwrap().len();
            if n == 0 {
                break;
            }
            sizes.push(n);
        }
        assert_eq!(sizes, [spool::CHUNK, spool::CHUNK, 5]);
    }

    #[tokio::test]
    async fn every_holder_of_the_bytes_holds_their_share_of_the_budget() {
        let _turn = BUDGET.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let base = IN_MEMORY.load(Ordering::Acquire);
        let mut receiving = Receiving::new(u64::MAX, dir.path());
        receiving.write(&[b'x'; 1000]).await;
        let content = receiving.finish().await.unwrap();
        let held = IN_MEMORY.load(Ordering::Acquire) - base;
        assert_eq!(held, 4096, "the first buffer");
        // A copy on its way to a file and a reader outlive the message.
        let owned = content.source().to_owned();
        let mut reader = Reader::open(content.source()).await.unwrap();
        let now = || IN_MEMORY.load(Ordering::Acquire) - base;
        drop(content);
        assert_eq!(now(), held, "the copy and the reader hold it");
        drop(owned);
        assert_eq!(now(), held, "the reader holds it");
        assert_eq!(reader.next().await.unwrap(), &[b'x'; 1000][..]);
        drop(reader);
        assert_eq!(now(), 0, "all given back");
    }

    #[tokio::test]
    async fn a_spent_budget_sends_the_message_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        // A limit of 0 (SpoolMemory: 0) keeps nothing in memory.
        let mut receiving = Receiving::new(0, dir.path());
        receiving.write(b"Subject: x\r\n\r\nbody\r\n").await;
        let content = receiving.finish().await.unwrap();
        assert!(matches!(content, Content::File(_)));
        assert_eq!(
            read_all(content.source()).await,
            b"Subject: x\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn the_budget_is_given_back_when_dropped() {
        let _turn = BUDGET.blocking_lock();
        let base = IN_MEMORY.load(Ordering::Acquire);
        let limit = base + (1 << 40);
        let mut a = MemoryBudget::default();
        assert!(a.grow(1 << 39, limit));
        let mut b = MemoryBudget::default();
        assert!(!b.grow((1 << 39) + (1 << 30), limit), "over the limit");
        assert!(b.grow(1 << 30, limit));
        drop(a);
        assert!(b.grow(1 << 39, limit), "a's share is back");
        drop(b);
    }

    #[tokio::test]
    async fn a_copy_to_a_file_has_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = InMemory::from(Bytes::from_static(b"Subject: y\r\n\r\nhello\r\n"));
        let copy = Source::Memory(&bytes)
            .copy_to_file(dir.path(), "copy.")
            .await
            .unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), &bytes.bytes[..]);
        let again = Source::File(&copy)
            .copy_to_file(dir.path(), "copy.")
            .await
            .unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), &bytes.bytes[..]);
    }
}
