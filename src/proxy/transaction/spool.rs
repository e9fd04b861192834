//! The spool files of a filtered message, created, written, read and removed on the
//! blocking pool: TempDirectory may be a slow or stalled disk, and a `write(2)` stuck on it
//! must hold up this message only, never the async workers that serve every other session.
//!
//! The work is handed over in whole chunks of up to [`CHUNK`] bytes, one chunk in flight at a
//! time, so a message costs a few blocking calls per 64 KiB and at most two chunks of memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;
use tokio::task::JoinHandle;

/// The most bytes one blocking read or write handles.
pub(crate) const CHUNK: usize = 64 * 1024;

/// The first read of a file is this small: most messages are, and a large zeroed buffer per
/// message costs more than a few extra reads. Each full read doubles it, up to [`CHUNK`].
const FIRST_READ: usize = 16 * 1024;

/// Runs `work` on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io::Error::other(format!("spool task failed: {e}")))
}

/// A spool file in TempDirectory, removed (on the blocking pool) when dropped.
pub(crate) struct Spool(Option<NamedTempFile>, Option<File>);

impl Spool {
    /// Creates `count` empty spool files in `dir` in one blocking call (a pipe filter needs
    /// its input and its output), each with a descriptor opened for reading from its start
    /// ([`Spool::take_reader`]).
    pub(crate) async fn create(dir: &Path, count: usize) -> io::Result<Vec<Spool>> {
        let dir = dir.to_path_buf();
        blocking(move || {
            (0..count)
                .map(|_| {
                    let file = tempfile::Builder::new()
                        .prefix("proxsmtpd.")
                        .tempfile_in(&dir)?;
                    let reader = File::open(file.path())?;
                    Ok(Spool(Some(file), Some(reader)))
                })
                .collect()
        })
        .await?
    }

    /// One new spool file in `dir` ([`Spool::create`]).
    pub(crate) async fn one(dir: &Path) -> io::Result<Spool> {
        Spool::create(dir, 1)
            .await?
            .pop()
            .ok_or_else(|| io::Error::other("no spool file"))
    }

    /// A descriptor of the file that reads it from the start, whatever is written through
    /// the others (a pipe filter's stdin); opened when the file was created.
    pub(crate) fn take_reader(&mut self) -> Option<File> {
        self.1.take()
    }

    fn file(&self) -> &NamedTempFile {
        self.0.as_ref().expect("a spool file until dropped")
    }

    pub(crate) fn path(&self) -> &Path {
        self.file().path()
    }

    /// Removes the file now, on the blocking pool, and waits until it is gone: a
    /// transaction's files are gone before its session reads the next command, as the
    /// original's were (a `Spool` merely dropped is removed a moment later).
    pub(crate) async fn remove(mut self) {
        if let Some(file) = self.0.take() {
            let reader = self.1.take();
            // Cancelled with the session, the removal still runs to its end.
            let _ = blocking(move || drop((file, reader))).await;
        }
    }

    /// A [`Writer`] that appends to the file (its own descriptor of the open file).
    pub(crate) fn writer(&self) -> io::Result<Writer> {
        Ok(Writer::new(self.file().as_file().try_clone()?))
    }

    /// Another descriptor of the (new, empty) file for writing from its start (a filter's
    /// stdout): a `dup`, no disk access.
    pub(crate) fn output(&self) -> io::Result<File> {
        self.file().as_file().try_clone()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(file) = self.0.take() {
            drop_on_blocking_pool((file, self.1.take()));
        }
    }
}

/// Drops what removes a file when dropped on the blocking pool: unlinking may wait for the
/// disk as much as writing does. (Outside a runtime, here.)
fn drop_on_blocking_pool<T: Send + 'static>(removes: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(removes))),
        Err(_) => drop(removes),
    }
}

/// A copy of a message in TempDirectory for a reader of its own (a shadow), removed on the
/// blocking pool when dropped, as a [`Spool`] is.
pub(crate) struct TempCopy(Option<tempfile::TempPath>);

impl TempCopy {
    pub(crate) fn new(path: tempfile::TempPath) -> TempCopy {
        TempCopy(Some(path))
    }
}

impl std::ops::Deref for TempCopy {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.as_deref().expect("a copy until dropped")
    }
}

impl AsRef<Path> for TempCopy {
    fn as_ref(&self) -> &Path {
        self
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            drop_on_blocking_pool(path);
        }
    }
}

/// A finished write: the file and the buffer back, and how it went.
type Written = (File, Vec<u8>, io::Result<()>);

/// Writes a stream of bytes to a file in chunks of [`CHUNK`] on the blocking pool: the
/// next chunk is gathered while the previous one is written. After a failed write the rest
/// is dropped and [`Writer::finish`] returns the error.
pub(crate) struct Writer {
    /// The file, while no write is in flight.
    file: Option<File>,
    /// Bytes not handed over yet.
    pending: Vec<u8>,
    /// The buffer of the last finished write, for reuse.
    spare: Vec<u8>,
    inflight: Option<JoinHandle<Written>>,
    error: Option<io::Error>,
}

impl Writer {
    pub(crate) fn new(file: File) -> Writer {
        Writer {
            file: Some(file),
            pending: Vec::new(),
            spare: Vec::new(),
            inflight: None,
            error: None,
        }
    }

    /// Appends `data`; waits only when a full chunk is ready and the one before it is still
    /// being written.
    pub(crate) async fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.error.is_none() {
            let take = (CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == CHUNK {
                self.hand_over().await;
            }
        }
    }

    /// Writes what is left and waits for every write to end.
    pub(crate) async fn finish(mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.hand_over().await;
        }
        self.settle().await;
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Starts writing the pending bytes, after the write before them has ended.
    async fn hand_over(&mut self) {
        self.settle().await;
        if self.error.is_some() {
            self.pending.clear();
            return;
        }
        let Some(mut file) = self.file.take() else {
            return;
        };
        let chunk = std::mem::replace(&mut self.pending, std::mem::take(&mut self.spare));
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            let result = file.write_all(&chunk);
            (file, chunk, result)
        }));
    }

    /// Waits for the write in flight, if any.
    async fn settle(&mut self) {
        let Some(task) = self.inflight.take() else {
            return;
        };
        match task.await {
            Ok((file, mut chunk, result)) => {
                self.file = Some(file);
                chunk.clear();
                self.spare = chunk;
                if let Err(e) = result {
                    self.error = Some(e);
                }
            }
            Err(e) => self.error = Some(io::Error::other(format!("spool task failed: {e}"))),
        }
    }
}

/// Reads a file in chunks on the blocking pool. Opening reads the first chunk in the same
/// call, and a short read is the end of the file (a regular file reads short only there),
/// so a small message costs one blocking call.
pub(crate) struct Reader {
    file: Option<File>,
    buf: Vec<u8>,
    /// How much the next read asks for.
    want: usize,
    /// Bytes read ahead (by `open`) and not handed out yet.
    ready: Option<usize>,
    /// The last read was short: nothing more to read.
    at_end: bool,
}

impl Reader {
    pub(crate) async fn open(path: &Path) -> io::Result<Reader> {
        let path: PathBuf = path.to_path_buf();
        let (file, buf, n) = blocking(move || -> io::Result<_> {
            let mut file = File::open(path)?;
            let mut buf = vec![0; FIRST_READ];
            let n = read_up_to(&mut file, &mut buf)?;
            Ok((file, buf, n))
        })
        .await??;
        Ok(Reader {
            file: Some(file),
            buf,
            want: FIRST_READ,
            ready: Some(n),
            at_end: false,
        })
    }

    /// The next bytes of the file; empty at its end.
    pub(crate) async fn next(&mut self) -> io::Result<&[u8]> {
        let n = match self.ready.take() {
            Some(n) => n,
            None if self.at_end => 0,
            None => self.read().await?,
        };
        if n == self.want {
            self.want = (self.want * 2).min(CHUNK);
        } else {
            self.at_end = true;
        }
        Ok(&self.buf[..n])
    }

    async fn read(&mut self) -> io::Result<usize> {
        let Some(mut file) = self.file.take() else {
            return Err(io::Error::other("spool read after a failed one"));
        };
        let mut buf = std::mem::take(&mut self.buf);
        let want = self.want;
        let (file, buf, result) = blocking(move || {
            buf.resize(want, 0);
            let result = read_up_to(&mut file, &mut buf);
            (file, buf, result)
        })
        .await?;
        self.file = Some(file);
        self.buf = buf;
        result
    }
}

/// Fills `buf` unless the file ends first; the number of bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_written_in_pieces_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::one(dir.path()).await.unwrap();
        let data: Vec<u8> = (0..(3 * CHUNK + 12_345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut writer = spool.writer().unwrap();
        for piece in data.chunks(1000) {
            writer.write(piece).await;
        }
        writer.write(&[]).await;
        writer.finish().await.unwrap();

        let mut reader = Reader::open(spool.path()).await.unwrap();
        let mut back = Vec::new();
        let mut reads = 0;
        loop {
            let chunk = reader.next().await.unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= CHUNK);
            back.extend_from_slice(chunk);
            reads += 1;
        }
        assert_eq!(back, data);
        // 16 + 32 + 64 + 64 + 64 KiB: a few large reads, not one per 16 KiB.
        assert!(reads <= 5, "{reads} reads");
    }

    #[tokio::test]
    async fn dropping_the_spool_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::one(dir.path()).await.unwrap();
        let path = spool.path().to_path_buf();
        assert!(path.exists());
        drop(spool);
        for _ in 0..100 {
            if !path.exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{} left behind", path.display());
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_by_finish() {
        // /dev/full fails every write with ENOSPC.
        let Ok(full) = File::options().write(true).open("/dev/full") else {
            return;
        };
        let mut writer = Writer::new(full);
        writer.write(&vec![b'x'; 2 * CHUNK + 1]).await;
        let e = writer.finish().await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28), "{e}");
    }
}
