//! The store-and-forward outbox: every point and event goes through here before it is sent,
//! so that data measured while the broker is unreachable arrives late rather than never.
//!
//! On disk (`docs/telemetry-agent.md`, "Outbox"): a directory of segment files named by the
//! index of their first record (`0000000000000001.seg`, 16 hex digits), and a `state` file.
//! A record is framed as
//!
//! ```text
//! magic "DR" (2 bytes) | len u32 LE | crc32 u32 LE | index u64 LE | payload (len bytes)
//! ```
//!
//! where the CRC-32 (IEEE) covers index and payload. Every record has a unique, increasing
//! index, so a reader that finds a torn or corrupted frame scans forward to the next valid
//! magic + CRC and counts the records it lost from the gap between indices. Appends go to the
//! last segment; `sync()` (fdatasync) is grouped by the caller — once per collection round and
//! at most every `sync_interval` for local-interface data — so a kill -9 loses nothing written
//! (the page cache keeps it) and a power cut loses at most the unsynced tail.
//!
//! The `state` file holds two slots of `gen | acked | dropped | next_seq | crc32`; writes
//! alternate slots, so a torn write leaves the other slot valid. `acked` is the index of the
//! last record the server acknowledged; `dropped` the records discarded when full or lost to
//! corruption, since install; `next_seq` the number of the next batch.
//!
//! When the segments exceed `max_bytes` the oldest segment is deleted, acknowledged or not,
//! and its unacknowledged records are added to `dropped`.
//!
//! Pure state, no clock: the caller passes the time in (design decision 7).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use drover_proto::telemetry::{Event, Point};

const MAGIC: [u8; 2] = *b"DR";
const HEADER: usize = 2 + 4 + 4 + 8;
/// Largest payload accepted for one record.
pub const MAX_RECORD: usize = 4096;
const SLOT: usize = 8 * 4 + 4;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib and PNG compute it.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for p in parts {
        for &b in *p {
            c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// What one record holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Point(Point),
    Event(Event),
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let (tag, json) = match self {
            Record::Point(p) => (b'p', serde_json::to_vec(p)),
            Record::Event(e) => (b'e', serde_json::to_vec(e)),
        };
        let mut out = vec![tag];
        out.extend(json.unwrap_or_default());
        out
    }

    fn decode(b: &[u8]) -> Option<Record> {
        match b.split_first()? {
            (b'p', rest) => serde_json::from_slice(rest).ok().map(Record::Point),
            (b'e', rest) => serde_json::from_slice(rest).ok().map(Record::Event),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("record of {0} bytes, at most {MAX_RECORD}")]
    TooLarge(usize),
}

#[derive(Debug, Clone, Copy)]
pub struct OutboxConfig {
    /// Most bytes of segment files kept.
    pub max_bytes: u64,
    /// A new segment starts once the current one reaches this size.
    pub segment_bytes: u64,
    /// `false` (the simulator): never fdatasync; kill -9 still loses nothing, power loss may.
    pub fsync: bool,
}

impl OutboxConfig {
    pub fn new(max_bytes: u64) -> Self {
        let segment_bytes = (max_bytes / 8).clamp(4096, 1 << 20);
        OutboxConfig { max_bytes, segment_bytes, fsync: true }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Persisted {
    gen_: u64,
    acked: u64,
    dropped: u64,
    next_seq: u64,
}

struct Segment {
    first: u64,
    path: PathBuf,
    len: u64,
}

/// Where reading stands: the segment (by its first index) and the byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    segment: u64,
    offset: u64,
}

/// Records read for one batch.
#[derive(Debug, Default)]
pub struct ReadRecords {
    pub points: Vec<Point>,
    pub events: Vec<Event>,
    /// Index of the last record included (0: none).
    pub last: u64,
}

/// The outbox of one device.
pub struct Outbox {
    dir: PathBuf,
    cfg: OutboxConfig,
    segments: Vec<Segment>,
    active: Option<File>,
    state_file: File,
    st: Persisted,
    /// Index the next appended record gets.
    next_index: u64,
    /// Next record to read for a batch.
    cursor: Cursor,
    /// Index of the last record read (the cursor's predecessor).
    read_to: u64,
    unsynced: bool,
    /// Records lost to corruption found so far in this run (also counted in `dropped`).
    corrupt: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io { path: path.to_path_buf(), source }
}

fn seg_name(first: u64) -> String {
    format!("{first:016x}.seg")
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`. Torn tails and corrupted records are detected
    /// here and while reading; they are skipped and counted, never fatal.
    pub fn open(dir: &Path, cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let state_path = dir.join("state");
        let mut state_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&state_path)
            .map_err(io(&state_path))?;
        let mut raw = Vec::new();
        state_file.read_to_end(&mut raw).map_err(io(&state_path))?;
        let st = [0, SLOT]
            .iter()
            .filter_map(|&o| raw.get(o..o + SLOT).and_then(decode_slot))
            .max_by_key(|s| s.gen_)
            .unwrap_or(Persisted { next_seq: 1, ..Default::default() });
        let mut segments = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = e.file_name();
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            segments.push(Segment { first, path: e.path(), len });
        }
        segments.sort_by_key(|s| s.first);
        let mut ob = Outbox {
            dir: dir.to_path_buf(),
            cfg,
            segments,
            active: None,
            state_file,
            st,
            next_index: st.acked + 1,
            cursor: Cursor { segment: 0, offset: 0 },
            read_to: st.acked,
            unsynced: false,
            corrupt: 0,
        };
        ob.recover_tail()?;
        ob.delete_acked_segments()?;
        ob.rewind();
        Ok(ob)
    }

    /// Finds the valid records of the last segment: the next index follows the highest, and a
    /// torn tail after the last one is cut off so appends start on a clean frame.
    fn recover_tail(&mut self) -> Result<(), OutboxError> {
        while let Some(last) = self.segments.last() {
            let path = last.path.clone();
            let data = std::fs::read(&path).map_err(io(&path))?;
            let mut pos = 0;
            let mut end = 0;
            let mut last_index = None;
            while let Some((_, idx, _, next)) = scan(&data, pos) {
                // The highest index, not the last one: after a stale copy of an older frame
                // at the end, new records must still get indices above every one written.
                last_index = Some(last_index.map_or(idx, |l: u64| l.max(idx)));
                end = next;
                pos = next;
            }
            match last_index {
                Some(idx) => {
                    if end < data.len() {
                        tracing::warn!(
                            segment = %path.display(),
                            bytes = data.len() - end,
                            "outbox: torn record at the end of the last segment, cut off"
                        );
                        self.add_dropped(1);
                        let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                        f.set_len(end as u64).map_err(io(&path))?;
                        f.sync_data().map_err(io(&path))?;
                        self.segments.last_mut().expect("checked").len = end as u64;
                    }
                    self.next_index = self.next_index.max(idx + 1);
                    return Ok(());
                }
                None => {
                    if !data.is_empty() {
                        tracing::warn!(segment = %path.display(), "outbox: segment without a valid record, removed");
                        self.add_dropped(1);
                    }
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    self.segments.pop();
                }
            }
        }
        Ok(())
    }

    /// Records discarded (full, corrupted) since install.
    pub fn dropped(&self) -> u64 {
        self.st.dropped
    }

    /// Records lost to corruption found in this run.
    pub fn corrupt(&self) -> u64 {
        self.corrupt
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Records appended but not acknowledged.
    pub fn pending(&self) -> u64 {
        self.next_index - 1 - self.st.acked
    }

    /// Records appended and not yet read into a batch since the last rewind.
    pub fn unread(&self) -> bool {
        self.read_to + 1 < self.next_index
    }

    /// The number for the next batch, persisted (not synced) so it survives a restart.
    pub fn take_seq(&mut self) -> Result<u64, OutboxError> {
        let seq = self.st.next_seq.max(1);
        self.st.next_seq = seq + 1;
        self.write_state(false)?;
        Ok(seq)
    }

    fn add_dropped(&mut self, n: u64) {
        self.st.dropped += n;
    }

    /// Appends one record (buffered in the page cache; see [`Outbox::sync`]).
    pub fn append(&mut self, rec: &Record) -> Result<(), OutboxError> {
        let payload = rec.encode();
        if payload.len() > MAX_RECORD {
            return Err(OutboxError::TooLarge(payload.len()));
        }
        let index = self.next_index;
        let frame = frame(index, &payload);
        let need_new = match self.segments.last() {
            None => true,
            Some(s) => s.len + frame.len() as u64 > self.cfg.segment_bytes && s.len > 0,
        };
        if need_new {
            if let Some(f) = self.active.take()
                && self.cfg.fsync
            {
                let _ = f.sync_data();
            }
            let path = self.dir.join(seg_name(index));
            self.segments.push(Segment { first: index, path, len: 0 });
        }
        if self.active.is_none() {
            let path = self.segments.last().expect("pushed").path.clone();
            self.active = Some(OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?);
        }
        let seg = self.segments.last_mut().expect("pushed");
        let path = seg.path.clone();
        self.active.as_mut().expect("opened").write_all(&frame).map_err(io(&path))?;
        seg.len += frame.len() as u64;
        self.next_index += 1;
        self.unsynced = true;
        self.enforce_bound()?;
        Ok(())
    }

    /// Drops the oldest segments while the outbox is over its bound (never the one being
    /// written).
    fn enforce_bound(&mut self) -> Result<(), OutboxError> {
        while self.bytes() > self.cfg.max_bytes && self.segments.len() > 1 {
            let s = self.segments.remove(0);
            let next_first = self.segments[0].first;
            let unacked = next_first.saturating_sub(s.first.max(self.st.acked + 1));
            std::fs::remove_file(&s.path).map_err(io(&s.path))?;
            tracing::warn!(records = unacked, "outbox full: dropped its oldest segment");
            self.add_dropped(unacked);
            self.st.acked = self.st.acked.max(next_first - 1);
            if self.read_to < self.st.acked {
                self.rewind();
            }
            self.write_state(true)?;
        }
        Ok(())
    }

    /// Makes every append so far durable (fdatasync), if configured to.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        if self.unsynced {
            self.unsynced = false;
            if self.cfg.fsync
                && let Some(f) = &self.active
            {
                f.sync_data().map_err(io(&self.dir))?;
            }
        }
        Ok(())
    }

    /// Starts reading again at the first unacknowledged record (after a reconnect or an ack
    /// timeout).
    pub fn rewind(&mut self) {
        self.read_to = self.st.acked;
        self.cursor = match self.segments.first() {
            Some(s) => Cursor { segment: s.first, offset: 0 },
            None => Cursor { segment: self.next_index, offset: 0 },
        };
    }

    /// Reads the next records after the cursor, at most `max_points` points, `max_events`
    /// events and about `max_bytes` of payload. Records already acknowledged are skipped;
    /// corrupted ones are skipped and counted.
    pub fn read_batch(
        &mut self,
        max_points: usize,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadRecords, OutboxError> {
        let mut out = ReadRecords { last: self.read_to, ..Default::default() };
        let mut bytes = 0;
        'segments: while let Some(si) = self.segments.iter().position(|s| s.first >= self.cursor.segment) {
            if self.segments[si].first != self.cursor.segment {
                self.cursor = Cursor { segment: self.segments[si].first, offset: 0 };
            }
            let seg = &self.segments[si];
            let path = seg.path.clone();
            let seg_len = seg.len;
            if self.cursor.offset >= seg_len {
                match self.segments.get(si + 1) {
                    Some(n) => {
                        self.cursor = Cursor { segment: n.first, offset: 0 };
                        continue;
                    }
                    None => break,
                }
            }
            let want = (seg_len - self.cursor.offset).min((max_bytes + MAX_RECORD + HEADER) as u64);
            let mut buf = vec![0u8; want as usize];
            {
                let mut f = File::open(&path).map_err(io(&path))?;
                f.seek(SeekFrom::Start(self.cursor.offset)).map_err(io(&path))?;
                let n = read_full(&mut f, &mut buf).map_err(io(&path))?;
                buf.truncate(n);
            }
            let at_end_of_file = self.cursor.offset + buf.len() as u64 >= seg_len;
            let mut pos = 0;
            loop {
                let Some((at, idx, payload, next)) = scan(&buf, pos) else {
                    // No further complete frame in what was read.
                    if at_end_of_file {
                        if pos < buf.len() {
                            // Garbage at the end of a segment; records lost there show as a
                            // gap in the indices that follow.
                            tracing::warn!(segment = %path.display(), "outbox: corrupted tail skipped");
                        }
                        self.cursor.offset = seg_len;
                        continue 'segments;
                    }
                    if pos == 0 {
                        // Nothing valid in a full window: skip it.
                        // Any frame starting this early would have been complete in the window.
                        tracing::warn!(segment = %path.display(), "outbox: corrupted region skipped");
                        self.cursor.offset += buf.len().saturating_sub(MAX_RECORD + HEADER).max(1) as u64;
                    } else {
                        self.cursor.offset += pos as u64;
                    }
                    continue 'segments;
                };
                if at > pos {
                    tracing::warn!(segment = %path.display(), bytes = at - pos, "outbox: corrupted bytes skipped");
                }
                let expected = self.read_to + 1;
                if idx < expected {
                    // Acknowledged already (or a duplicate): skip.
                    pos = next;
                    if pos >= buf.len() {
                        self.cursor.offset += pos as u64;
                        continue 'segments;
                    }
                    continue;
                }
                let is_point = payload.first() == Some(&b'p');
                if (is_point && out.points.len() >= max_points)
                    || (!is_point && out.events.len() >= max_events)
                    || bytes + payload.len() > max_bytes && bytes > 0
                {
                    self.cursor.offset += at as u64;
                    break 'segments;
                }
                if idx > expected {
                    self.note_corrupt(idx - expected);
                }
                match Record::decode(payload) {
                    Some(Record::Point(p)) => out.points.push(p),
                    Some(Record::Event(e)) => out.events.push(e),
                    None => self.note_corrupt(1),
                }
                bytes += payload.len();
                self.read_to = idx;
                out.last = idx;
                pos = next;
                if pos >= buf.len() {
                    self.cursor.offset += pos as u64;
                    continue 'segments;
                }
            }
        }
        Ok(out)
    }

    fn note_corrupt(&mut self, n: u64) {
        self.corrupt += n;
        self.add_dropped(n);
    }

    /// The server stored every record up to `last`: forget them (delete whole segments).
    pub fn ack(&mut self, last: u64) -> Result<(), OutboxError> {
        if last <= self.st.acked {
            return Ok(());
        }
        self.st.acked = last.min(self.next_index - 1);
        if self.read_to < self.st.acked {
            self.read_to = self.st.acked;
        }
        self.delete_acked_segments()?;
        self.write_state(true)
    }

    fn delete_acked_segments(&mut self) -> Result<(), OutboxError> {
        // A segment is fully acknowledged when the next one starts at or before acked + 1.
        while self.segments.len() > 1 && self.segments[1].first <= self.st.acked + 1 {
            let s = self.segments.remove(0);
            std::fs::remove_file(&s.path).map_err(io(&s.path))?;
        }
        if self.segments.len() == 1 && self.next_index == self.st.acked + 1 {
            let s = self.segments.remove(0);
            self.active = None;
            std::fs::remove_file(&s.path).map_err(io(&s.path))?;
        }
        Ok(())
    }

    fn write_state(&mut self, sync: bool) -> Result<(), OutboxError> {
        self.st.gen_ += 1;
        let slot = encode_slot(&self.st);
        let off = if self.st.gen_.is_multiple_of(2) { 0 } else { SLOT as u64 };
        let path = self.dir.join("state");
        use std::os::unix::fs::FileExt;
        self.state_file.write_all_at(&slot, off).map_err(io(&path))?;
        if sync && self.cfg.fsync {
            // The segments the state refers to must be on disk first.
            self.sync()?;
            self.state_file.sync_data().map_err(io(&path))?;
        }
        Ok(())
    }

    /// Persists the counters now (dropped records found while reading).
    pub fn save(&mut self) -> Result<(), OutboxError> {
        self.write_state(true)
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn frame(index: u64, payload: &[u8]) -> Vec<u8> {
    let idx = index.to_le_bytes();
    let mut f = Vec::with_capacity(HEADER + payload.len());
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32(&[&idx, payload]).to_le_bytes());
    f.extend_from_slice(&idx);
    f.extend_from_slice(payload);
    f
}

/// The first valid frame at or after `pos`: (its offset, index, payload, offset after it).
fn scan(buf: &[u8], mut pos: usize) -> Option<(usize, u64, &[u8], usize)> {
    while pos + HEADER <= buf.len() {
        if buf[pos..pos + 2] == MAGIC {
            let len = u32::from_le_bytes(buf[pos + 2..pos + 6].try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(buf[pos + 6..pos + 10].try_into().ok()?);
            let end = pos + HEADER + len;
            if len <= MAX_RECORD && end <= buf.len() {
                let idx_b = &buf[pos + 10..pos + 18];
                let payload = &buf[pos + HEADER..end];
                if crc32(&[idx_b, payload]) == crc {
                    return Some((pos, u64::from_le_bytes(idx_b.try_into().ok()?), payload, end));
                }
            }
        }
        pos += 1;
    }
    None
}

fn encode_slot(s: &Persisted) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    for (i, v) in [s.gen_, s.acked, s.dropped, s.next_seq].iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let c = crc32(&[&b[..32]]);
    b[32..].copy_from_slice(&c.to_le_bytes());
    b
}

fn decode_slot(b: &[u8]) -> Option<Persisted> {
    let c = u32::from_le_bytes(b[32..36].try_into().ok()?);
    if crc32(&[&b[..32]]) != c || b[..32].iter().all(|&x| x == 0) {
        return None;
    }
    let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some(Persisted { gen_: w(0), acked: w(1), dropped: w(2), next_seq: w(3) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: i64) -> Record {
        Record::Point(Point { n: "m".into(), t, v: t as f64 })
    }

    fn cfg(max: u64, seg: u64) -> OutboxConfig {
        OutboxConfig { max_bytes: max, segment_bytes: seg, fsync: true }
    }

    fn times(r: &ReadRecords) -> Vec<i64> {
        r.points.iter().map(|p| p.t).collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
    }

    #[test]
    fn append_read_ack_in_order_and_reopen() {
        let d = tmp("order");
        let mut o = Outbox::open(&d, cfg(1 << 20, 256)).unwrap();
        for t in 1..=20 {
            o.append(&p(t)).unwrap();
        }
        o.sync().unwrap();
        let b = o.read_batch(8, 8, 1 << 16).unwrap();
        assert_eq!(times(&b), (1..=8).collect::<Vec<_>>());
        assert_eq!(b.last, 8);
        let b2 = o.read_batch(100, 8, 1 << 16).unwrap();
        assert_eq!(times(&b2), (9..=20).collect::<Vec<_>>());
        o.ack(8).unwrap();
        assert_eq!(o.pending(), 12);
        drop(o);
        // Reopen (as after a crash): unacknowledged records come again, in order.
        let mut o = Outbox::open(&d, cfg(1 << 20, 256)).unwrap();
        assert_eq!(o.pending(), 12);
        let b = o.read_batch(100, 8, 1 << 16).unwrap();
        assert_eq!(times(&b), (9..=20).collect::<Vec<_>>());
        // Rewind re-reads from the first unacknowledged record.
        o.rewind();
        assert_eq!(times(&o.read_batch(3, 8, 1 << 16).unwrap()), vec![9, 10, 11]);
        o.ack(20).unwrap();
        assert_eq!(o.pending(), 0);
        assert_eq!(o.bytes(), 0, "acknowledged segments are deleted");
        assert_eq!(o.dropped(), 0);
        let s1 = o.take_seq().unwrap();
        drop(o);
        let mut o = Outbox::open(&d, cfg(1 << 20, 256)).unwrap();
        assert_eq!(o.take_seq().unwrap(), s1 + 1, "batch numbers survive a restart");
        o.append(&p(21)).unwrap();
        assert_eq!(times(&o.read_batch(100, 8, 1 << 16).unwrap()), vec![21]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Bad input: more data than the bound allows.
    #[test]
    fn bound_drops_oldest_and_counts_persistently() {
        let d = tmp("bound");
        let mut o = Outbox::open(&d, cfg(2000, 500)).unwrap();
        for t in 1..=200 {
            o.append(&p(t)).unwrap();
        }
        assert!(o.bytes() <= 2000, "{}", o.bytes());
        let dropped = o.dropped();
        assert!(dropped > 100, "{dropped}");
        let b = o.read_batch(1000, 8, 1 << 20).unwrap();
        // What is left is the newest, contiguous and in order.
        assert_eq!(times(&b), ((dropped as i64 + 1)..=200).collect::<Vec<_>>());
        drop(o);
        let o = Outbox::open(&d, cfg(2000, 500)).unwrap();
        assert_eq!(o.dropped(), dropped, "the drop counter survives a restart");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Bad input: garbage appended to a segment, a flipped byte, a torn tail.
    #[test]
    fn corrupted_and_truncated_segments_are_skipped() {
        let d = tmp("corrupt");
        let mut o = Outbox::open(&d, cfg(1 << 20, 300)).unwrap();
        for t in 1..=30 {
            o.append(&p(t)).unwrap();
        }
        drop(o);
        let mut segs: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        assert!(segs.len() >= 3, "{segs:?}");
        // Flip a byte in the middle of the first segment's second record.
        let mut first = std::fs::read(&segs[0]).unwrap();
        let (_, _, _, second) = scan(&first, 0).unwrap();
        first[second + HEADER + 3] ^= 0xff;
        std::fs::write(&segs[0], &first).unwrap();
        // Garbage appended to the second segment.
        let mut f = OpenOptions::new().append(true).open(&segs[1]).unwrap();
        f.write_all(b"DR\x05\x00\x00\x00garbage garbage").unwrap();
        // The last segment loses half its last record (a torn write).
        let last = segs.last().unwrap();
        let len = std::fs::metadata(last).unwrap().len();
        OpenOptions::new().write(true).open(last).unwrap().set_len(len - 10).unwrap();

        let mut o = Outbox::open(&d, cfg(1 << 20, 300)).unwrap();
        o.append(&p(31)).unwrap();
        let b = o.read_batch(1000, 8, 1 << 20).unwrap();
        let got = times(&b);
        let want: Vec<i64> = (1..=31).filter(|&t| t != 2 && t != 30).collect();
        assert_eq!(got, want);
        // The flipped record (a gap in the indices) and the torn one; the garbage held none.
        assert_eq!(o.dropped(), 2, "corrupt {}", o.corrupt());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn events_and_byte_budget() {
        let d = tmp("events");
        let mut o = Outbox::open(&d, cfg(1 << 20, 1 << 16)).unwrap();
        let ev = |i: u64| {
            Record::Event(Event {
                id: format!("e{i}"),
                t: i as i64,
                name: "x".into(),
                severity: drover_proto::telemetry::Severity::Info,
                data: Default::default(),
            })
        };
        o.append(&ev(1)).unwrap();
        o.append(&p(2)).unwrap();
        o.append(&ev(3)).unwrap();
        o.append(&p(4)).unwrap();
        let b = o.read_batch(100, 1, 1 << 16).unwrap();
        assert_eq!((b.events.len(), times(&b)), (1, vec![2]), "stops at the event limit, in order");
        let b = o.read_batch(100, 8, 1).unwrap();
        assert_eq!(b.events.len(), 1, "at least one record even over the byte budget");
        assert!(matches!(
            o.append(&Record::Point(Point { n: "x".repeat(5000), t: 1, v: 1.0 })),
            Err(OutboxError::TooLarge(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
