//! Replayable request bodies: byte buffers and file ranges reopened for every attempt.

use std::fmt;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

const CHUNK: usize = 64 * 1024;

/// Called with (bytes sent so far, total) as an attempt's body goes out. Restarts from 0
/// when an attempt is replayed.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// The content to upload. Replayable: bytes are shared, a file is reopened per attempt.
#[derive(Clone, PartialEq, Eq)]
pub enum Payload {
    /// In memory.
    Bytes(Bytes),
    /// `len` bytes of a file starting at `offset`.
    File {
        /// The file.
        path: PathBuf,
        /// First byte.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Bytes(b) => write!(f, "Payload::Bytes({} bytes)", b.len()),
            Payload::File { path, offset, len } => {
                write!(f, "Payload::File({}, {offset}+{len})", path.display())
            }
        }
    }
}

impl Payload {
    /// A whole file (its size is read now).
    pub async fn file(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let len = tokio::fs::metadata(&path).await?.len();
        Ok(Payload::File {
            path,
            offset: 0,
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A sub-range (used for multipart parts).
    pub fn slice(&self, start: u64, len: u64) -> Payload {
        match self {
            Payload::Bytes(b) => Payload::Bytes(b.slice(start as usize..(start + len) as usize)),
            Payload::File { path, offset, .. } => Payload::File {
                path: path.clone(),
                offset: offset + start,
                len,
            },
        }
    }

    /// Reads the whole payload into memory.
    pub async fn read_all(&self) -> std::io::Result<Bytes> {
        match self {
            Payload::Bytes(b) => Ok(b.clone()),
            Payload::File { path, offset, len } => {
                use tokio::io::AsyncReadExt;
                let mut f = tokio::fs::File::open(path).await?;
                f.seek(SeekFrom::Start(*offset)).await?;
                let mut buf = Vec::with_capacity(*len as usize);
                f.take(*len).read_to_end(&mut buf).await?;
                if (buf.len() as u64) != *len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank during upload",
                    ));
                }
                Ok(buf.into())
            }
        }
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::Bytes(b)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Payload::Bytes(b.into())
    }
}

/// A request body made of segments (e.g. multipart prefix, file, suffix).
#[derive(Clone, Debug, Default)]
pub(crate) struct BodySpec {
    pub(crate) segments: Vec<Payload>,
}

impl BodySpec {
    pub(crate) fn new(segments: Vec<Payload>) -> Self {
        Self { segments }
    }

    pub(crate) fn len(&self) -> u64 {
        self.segments.iter().map(Payload::len).sum()
    }

    /// Opens the body for one attempt.
    pub(crate) async fn open(&self, progress: Option<Progress>) -> std::io::Result<SendBody> {
        let mut open = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            match s {
                Payload::Bytes(b) => open.push(Seg::Bytes(b.clone())),
                Payload::File { path, offset, len } => {
                    let mut f = tokio::fs::File::open(path).await?;
                    if *offset > 0 {
                        f.seek(SeekFrom::Start(*offset)).await?;
                    }
                    open.push(Seg::File {
                        file: f,
                        left: *len,
                    });
                }
            }
        }
        open.reverse();
        Ok(SendBody {
            segs: open,
            sent: 0,
            tracker: Arc::default(),
            total: self.len(),
            progress,
        })
    }
}

enum Seg {
    Bytes(Bytes),
    File { file: tokio::fs::File, left: u64 },
}

/// What happened to one attempt's body once hyper took it.
#[derive(Debug, Default)]
pub(crate) struct BodyTracker {
    /// Bytes handed to hyper: zero means nothing of the body can have reached the server.
    pub(crate) polled: AtomicU64,
    /// Reading the body failed (hyper then resets the stream or closes the connection).
    pub(crate) failed: AtomicBool,
}

/// The body of one attempt.
pub(crate) struct SendBody {
    segs: Vec<Seg>, // reversed: the next segment is last
    sent: u64,
    /// What happened to the body, readable after it was handed to hyper.
    tracker: Arc<BodyTracker>,
    total: u64,
    progress: Option<Progress>,
}

impl SendBody {
    /// What happens to this body, readable after it was moved into a request.
    pub(crate) fn tracker(&self) -> Arc<BodyTracker> {
        self.tracker.clone()
    }

    /// Body length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.total
    }

    fn advance(&mut self, n: usize) {
        self.sent += n as u64;
        self.tracker.polled.store(self.sent, Ordering::Relaxed);
        if let Some(p) = &self.progress {
            p(self.sent, self.total);
        }
    }
}

impl http_body::Body for SendBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(seg) = this.segs.last_mut() else {
                return Poll::Ready(None);
            };
            match seg {
                Seg::Bytes(b) => {
                    if b.is_empty() {
                        this.segs.pop();
                        continue;
                    }
                    let chunk = b.split_to(b.len().min(CHUNK));
                    this.advance(chunk.len());
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Seg::File { file, left } => {
                    if *left == 0 {
                        this.segs.pop();
                        continue;
                    }
                    let want = (*left).min(CHUNK as u64) as usize;
                    let mut buf = BytesMut::zeroed(want);
                    let mut rb = ReadBuf::new(&mut buf);
                    match Pin::new(file).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => {
                            this.tracker.failed.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(e)));
                        }
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            if n == 0 {
                                this.tracker.failed.store(true, Ordering::Relaxed);
                                return Poll::Ready(Some(Err(std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "file shrank during upload",
                                ))));
                            }
                            *left -= n as u64;
                            buf.truncate(n);
                            this.advance(n);
                            return Poll::Ready(Some(Ok(Frame::data(buf.freeze()))));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total - self.sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Mutex;

    #[tokio::test]
    async fn segments_and_file_ranges_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Payload::file(&path).await.unwrap();
        let spec = BodySpec::new(vec![
            Payload::Bytes(Bytes::from_static(b"head")),
            file.slice(1000, 150_000),
            Payload::Bytes(Bytes::from_static(b"tail")),
        ]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let progress: Progress = Arc::new(move |a, b| s2.lock().unwrap().push((a, b)));
        for _ in 0..2 {
            let body = spec.open(Some(progress.clone())).await.unwrap();
            let got = body.collect().await.unwrap().to_bytes();
            let mut want = b"head".to_vec();
            want.extend_from_slice(&data[1000..151_000]);
            want.extend_from_slice(b"tail");
            assert_eq!(got.as_ref(), want.as_slice());
        }
        let seen = seen.lock().unwrap();
        assert_eq!(*seen.last().unwrap(), (150_008, 150_008));
        assert!(seen.iter().all(|(a, b)| a <= b));
    }
}
