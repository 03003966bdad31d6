//! Where artifact files live (design decision 4): an object store, content-addressed —
//! `artifacts/{sha256}` — in a local directory (the default: `DATA_DIR/artifacts/`) or an
//! S3-compatible bucket (`s3://BUCKET/PREFIX`), through the `object_store` crate.
//!
//! Uploads are written under `artifacts/uploads/{uuid}` while they stream in and are
//! verified, then renamed to their content address; a failed upload removes its temporary
//! object. The same bytes uploaded twice end at the same key, so a rename over an existing
//! object changes nothing.
//!
//! Reads are ranged streams. A local store is read straight from its file with one reusable
//! buffer (the download endpoint's fast path); S3 streams what the bucket sends.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, StreamExt as _};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt as _, WriteMultipart};

/// Bytes read from a local artifact file at a time (and the largest body frame sent).
pub const READ_CHUNK: usize = 256 * 1024;
/// Part size of uploads to the store (S3's minimum part is 5 MiB).
const UPLOAD_PART: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid artifact_store {url:?}: {why}")]
    Config { url: String, why: String },
    #[error("artifact store: {0}")]
    Object(#[from] object_store::Error),
    #[error("artifact store: {0}")]
    Io(#[from] std::io::Error),
    #[error("artifact store: the object {0} is missing")]
    Missing(String),
}

impl StoreError {
    /// True when the store refused for lack of space (`ENOSPC` anywhere in the error's
    /// chain: a local store on a full disk).
    pub fn is_storage_full(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && crate::db::is_io_storage_full(io)
            {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

impl From<StoreError> for crate::error::AppError {
    fn from(e: StoreError) -> Self {
        if e.is_storage_full() {
            tracing::warn!(error = %e, "artifact store: a write failed for lack of space");
            return crate::error::AppError::store_full();
        }
        crate::error::AppError::Internal(e.to_string())
    }
}

/// The artifact store: an object store plus, when it is a local directory, that directory.
#[derive(Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    /// Root of a local store, for reading files directly.
    local_root: Option<PathBuf>,
    description: String,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// The content address of an artifact in the store.
pub fn artifact_key(id: &str) -> ObjectPath {
    ObjectPath::from(format!("artifacts/{id}"))
}

impl ArtifactStore {
    /// A local store rooted at `dir` (created if missing): artifacts in `dir/artifacts/`.
    pub fn local(dir: &std::path::Path) -> Result<ArtifactStore, StoreError> {
        std::fs::create_dir_all(dir.join("artifacts"))?;
        let root = dir.canonicalize()?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)?;
        Ok(ArtifactStore {
            inner: Arc::new(fs),
            description: format!("local directory {}", root.join("artifacts").display()),
            local_root: Some(root),
        })
    }

    /// The store the configuration names: empty for `DATA_DIR` (artifacts in
    /// `DATA_DIR/artifacts/`), `file:///PATH` for another directory, or `s3://BUCKET[/PREFIX]`
    /// with credentials, region and endpoint from the usual `AWS_*` variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
    /// `AWS_ALLOW_HTTP` for a local S3-compatible server…).
    pub fn open(url: &str, data_dir: &std::path::Path) -> Result<ArtifactStore, StoreError> {
        let bad = |why: &str| StoreError::Config { url: url.to_string(), why: why.to_string() };
        if url.is_empty() {
            return ArtifactStore::local(data_dir);
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file:// store needs an absolute path (file:///var/lib/drover)"));
            }
            return ArtifactStore::local(std::path::Path::new(path));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(bad("use s3://BUCKET/PREFIX, file:///PATH, or leave it empty for the data directory"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        ArtifactStore::s3(object_store::aws::AmazonS3Builder::from_env(), bucket, prefix)
            .map_err(|e| bad(&e.to_string()))
    }

    /// An S3 store in `bucket` under `prefix`, configured by `builder` (credentials, region,
    /// endpoint…; [`ArtifactStore::open`] takes them from the `AWS_*` variables).
    pub fn s3(
        builder: object_store::aws::AmazonS3Builder,
        bucket: &str,
        prefix: &str,
    ) -> Result<ArtifactStore, StoreError> {
        // reqwest's rustls has no provider of its own: it takes the process's, which is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3 = builder.with_bucket_name(bucket).build()?;
        let prefix = prefix.trim_matches('/');
        let inner: Arc<dyn ObjectStore> =
            if prefix.is_empty() { Arc::new(s3) } else { Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)) };
        Ok(ArtifactStore { inner, local_root: None, description: format!("S3 bucket {bucket} prefix {prefix:?}") })
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Starts writing a new upload under a temporary key.
    pub async fn begin_upload(&self) -> Result<Upload, StoreError> {
        let key = ObjectPath::from(format!("artifacts/uploads/{}", uuid::Uuid::now_v7().simple()));
        let multipart = self.inner.put_multipart(&key).await?;
        Ok(Upload {
            store: self.clone(),
            key,
            writer: Some(WriteMultipart::new_with_chunk_size(multipart, UPLOAD_PART)),
        })
    }

    pub async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        match self.inner.head(&artifact_key(id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        match self.inner.delete(&artifact_key(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The bytes `start..end` of artifact `id` as a stream of chunks of at most
    /// [`READ_CHUNK`] bytes.
    pub async fn read_range(
        &self,
        id: &str,
        start: u64,
        end: u64,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, StoreError> {
        if let Some(root) = &self.local_root {
            let path = root.join("artifacts").join(id);
            let file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Missing(artifact_key(id).to_string()));
                }
                Err(e) => return Err(e.into()),
            };
            return Ok(local_range(file, start, end).boxed());
        }
        let opts = GetOptions { range: Some(GetRange::Bounded(start..end)), ..Default::default() };
        let got = match self.inner.get_opts(&artifact_key(id), opts).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::Missing(artifact_key(id).to_string())),
            Err(e) => return Err(e.into()),
        };
        Ok(got.into_stream().map(|r| r.map_err(std::io::Error::other)).boxed())
    }

    /// Removes uploads left behind by a server that stopped mid-upload (older than an hour).
    pub async fn remove_stale_uploads(&self) -> Result<usize, StoreError> {
        let cutoff = crate::time::now_ms() / 1000 - 3600;
        let prefix = ObjectPath::from("artifacts/uploads");
        let mut listing = self.inner.list(Some(&prefix));
        let mut removed = 0;
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if meta.last_modified.timestamp() < cutoff {
                let _ = self.inner.delete(&meta.location).await;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Reads `start..end` of a file with one buffer that is reused once the chunk sent before
/// has been written out (the `BytesMut` gets its allocation back when the `Bytes` split from
/// it is dropped), so a long download does not allocate per chunk.
fn local_range(
    file: tokio::fs::File,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    struct State {
        file: tokio::fs::File,
        buf: BytesMut,
        pos: u64,
        end: u64,
        seeked: bool,
    }
    let state = State { file, buf: BytesMut::with_capacity(READ_CHUNK), pos: start, end, seeked: false };
    futures_util::stream::try_unfold(state, |mut st| async move {
        if st.pos >= st.end {
            return Ok(None);
        }
        if !st.seeked {
            st.file.seek(std::io::SeekFrom::Start(st.pos)).await?;
            st.seeked = true;
        }
        let want = usize::try_from(st.end - st.pos).unwrap_or(usize::MAX).min(READ_CHUNK);
        st.buf.reserve(want);
        while st.buf.len() < want {
            let room = (want - st.buf.len()) as u64;
            let n = (&mut st.file).take(room).read_buf(&mut st.buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the artifact file is shorter than its record says",
                ));
            }
        }
        st.pos += want as u64;
        let chunk = st.buf.split().freeze();
        Ok(Some((chunk, st)))
    })
}

/// An upload being written to the store; dropped without [`Upload::commit`], it is aborted
/// (in the background).
pub struct Upload {
    store: ArtifactStore,
    key: ObjectPath,
    writer: Option<WriteMultipart>,
}

impl Upload {
    /// Appends bytes; waits while too many parts are in flight.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let w = self.writer.as_mut().expect("an upload is written before it is committed");
        w.wait_for_capacity(UPLOAD_CONCURRENCY).await?;
        w.put(chunk);
        Ok(())
    }

    /// Completes the upload and moves it to the content address of `id`.
    pub async fn commit(mut self, id: &str) -> Result<(), StoreError> {
        let w = self.writer.take().expect("committed once");
        w.finish().await?;
        let result = self.store.inner.rename(&self.key, &artifact_key(id)).await;
        if result.is_err() {
            let _ = self.store.inner.delete(&self.key).await;
        }
        result.map_err(StoreError::from)
    }

    /// Throws the upload away.
    pub async fn abort(mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.abort().await;
        }
        let _ = self.store.inner.delete(&self.key).await;
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // A request cancelled mid-upload (the client went away) lands here.
        if let Some(w) = self.writer.take() {
            let (store, key) = (self.store.inner.clone(), self.key.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = w.abort().await;
                    let _ = store.delete(&key).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        let dir = std::env::temp_dir().join(format!("drover-store-url-{}", uuid::Uuid::now_v7().simple()));
        let local = ArtifactStore::open("", &dir).unwrap();
        assert!(local.describe().ends_with("/artifacts"), "{}", local.describe());
        for (url, why) in [
            ("ftp://host/x", "use s3://"),
            ("s3://", "no bucket"),
            ("s3:///prefix", "no bucket"),
            ("file://relative/path", "absolute path"),
        ] {
            let e = ArtifactStore::open(url, &dir).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(url), "{url}: {e}");
        }
        let s3 = ArtifactStore::open("s3://bucket/fleet/eu/", &dir).unwrap();
        assert_eq!(s3.describe(), "S3 bucket bucket prefix \"fleet/eu\"");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_store_errors() {
        let enospc = || std::io::Error::from_raw_os_error(28);
        assert!(StoreError::Io(enospc()).is_storage_full());
        let wrapped = object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(enospc()) };
        assert!(StoreError::Object(wrapped).is_storage_full());
        assert!(!StoreError::Io(std::io::Error::from(std::io::ErrorKind::PermissionDenied)).is_storage_full());
        assert!(!StoreError::Missing("artifacts/x".into()).is_storage_full());
        let e: crate::error::AppError = StoreError::Io(enospc()).into();
        assert_eq!(e.status(), axum::http::StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(e.code(), "storage_full");
    }

    #[tokio::test]
    async fn uploads_land_at_their_content_address_and_read_back_in_ranges() {
        let dir = std::env::temp_dir().join(format!("drover-store-{}", uuid::Uuid::now_v7().simple()));
        let store = ArtifactStore::local(&dir).unwrap();
        let data: Vec<u8> = (0..(READ_CHUNK * 2 + 100)).map(|i| (i % 251) as u8).collect();
        let mut up = store.begin_upload().await.unwrap();
        for c in data.chunks(70_000) {
            up.write(Bytes::copy_from_slice(c)).await.unwrap();
        }
        up.commit("abc").await.unwrap();
        assert!(store.exists("abc").await.unwrap());
        assert!(dir.join("artifacts/abc").exists());
        let read = |s: u64, e: u64| {
            let store = store.clone();
            async move {
                let mut out = Vec::new();
                let mut st = store.read_range("abc", s, e).await.unwrap();
                while let Some(c) = st.next().await {
                    let c = c.unwrap();
                    assert!(c.len() <= READ_CHUNK);
                    out.extend_from_slice(&c);
                }
                out
            }
        };
        assert_eq!(read(0, data.len() as u64).await, data);
        assert_eq!(read(1000, 300_000).await, &data[1000..300_000]);
        let mut up = store.begin_upload().await.unwrap();
        up.write(Bytes::from_static(b"partial")).await.unwrap();
        up.abort().await;
        assert_eq!(std::fs::read_dir(dir.join("artifacts/uploads")).map(|d| d.count()).unwrap_or(0), 0);
        store.delete("abc").await.unwrap();
        assert!(!store.exists("abc").await.unwrap());
        assert!(matches!(store.read_range("abc", 0, 1).await, Err(StoreError::Missing(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
