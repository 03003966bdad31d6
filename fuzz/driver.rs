//! A small coverage-less fuzz driver for the stable toolchain, shared by the crates' tests
//! through `#[path]` (see FUZZING.md).
//!
//! It replays the regression inputs in `fuzz/corpus/<target>/`, runs every seed, then mutates
//! seeds (bit flips, byte insert/delete/overwrite, truncation, splicing two seeds, random
//! bytes, interesting values, dictionary tokens) for `DROVER_FUZZ_SECS` seconds (default 2).
//! A panic, or an input slower than `DROVER_FUZZ_SLOW_MS` (default 5000), is written to
//! `fuzz/corpus/<target>/crash-<hash>` (so that it is replayed from then on) and fails the test.
//! `DROVER_FUZZ_SEED` fixes the RNG seed (printed on every run).

#![allow(dead_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// xorshift64*.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const INTERESTING: &[&[u8]] = &[
    &[0],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0xff, 0xff],
    &[0x7f, 0xff, 0xff, 0xff],
    &[0x80, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[0xff, 0xff, 0xff, 0x7f],
    &[0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
];

/// One fuzz target: a name (its corpus folder), seeds, an optional dictionary.
pub struct Fuzz {
    name: String,
    seeds: Vec<Vec<u8>>,
    dict: Vec<Vec<u8>>,
    max_len: usize,
}

/// How a run went.
pub struct Report {
    pub execs: u64,
    pub secs: f64,
}

impl Fuzz {
    pub fn new(name: &str) -> Fuzz {
        Fuzz { name: name.into(), seeds: Vec::new(), dict: Vec::new(), max_len: 64 * 1024 }
    }
    pub fn seed(mut self, s: impl AsRef<[u8]>) -> Fuzz {
        self.seeds.push(s.as_ref().to_vec());
        self
    }
    pub fn seeds<S: AsRef<[u8]>>(mut self, s: impl IntoIterator<Item = S>) -> Fuzz {
        self.seeds.extend(s.into_iter().map(|s| s.as_ref().to_vec()));
        self
    }
    /// Tokens inserted or overwritten whole (keywords, JSON fragments).
    pub fn dict<S: AsRef<[u8]>>(mut self, d: impl IntoIterator<Item = S>) -> Fuzz {
        self.dict.extend(d.into_iter().map(|s| s.as_ref().to_vec()));
        self
    }
    pub fn max_len(mut self, n: usize) -> Fuzz {
        self.max_len = n;
        self
    }

    fn corpus_dir(&self) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(&self.name)
    }

    /// Runs `f` on the corpus, the seeds and mutated inputs; panics (failing the test) on the
    /// first input that makes `f` panic or take too long, after saving it.
    pub fn run(self, mut f: impl FnMut(&[u8])) -> Report {
        let secs: f64 = std::env::var("DROVER_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
        let slow = Duration::from_millis(
            std::env::var("DROVER_FUZZ_SLOW_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(5000),
        );
        let seed: u64 = std::env::var("DROVER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        let mut rng = Rng::new(seed);
        let start = Instant::now();
        let mut execs = 0u64;
        let mut one = |input: &[u8], what: &str| {
            let t = Instant::now();
            let r = catch_unwind(AssertUnwindSafe(|| f(input)));
            let took = t.elapsed();
            execs += 1;
            let problem = match r {
                Err(_) => "panicked",
                Ok(()) if took > slow => "was slow",
                Ok(()) => return,
            };
            if what == "corpus" {
                panic!("fuzz {}: a corpus input {problem} ({} bytes)", self.name, input.len());
            }
            let dir = self.corpus_dir();
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{:016x}", fnv(input)));
            let _ = std::fs::write(&path, input);
            panic!(
                "fuzz {}: a {what} input {problem} after {took:?}; saved to {} (seed {seed})",
                self.name,
                path.display()
            );
        };
        let mut corpus: Vec<PathBuf> = std::fs::read_dir(self.corpus_dir())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
            .unwrap_or_default();
        corpus.sort();
        for p in &corpus {
            one(&std::fs::read(p).unwrap(), "corpus");
        }
        for s in &self.seeds {
            one(s, "seed");
        }
        let budget = Duration::from_secs_f64(secs);
        let mut input = Vec::new();
        while start.elapsed() < budget {
            for _ in 0..64 {
                self.mutated(&mut rng, &mut input);
                one(&input, "mutated");
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!("fuzz {}: {execs} execs in {secs:.1} s, seed {seed}, no crash", self.name);
        Report { execs, secs }
    }

    /// A new input in `out`: a seed (or random bytes) with 1 to 8 mutations.
    fn mutated(&self, rng: &mut Rng, out: &mut Vec<u8>) {
        out.clear();
        if self.seeds.is_empty() || rng.chance(50) {
            let n = rng.below(64);
            out.extend(rng.bytes(n));
        } else {
            out.extend_from_slice(&self.seeds[rng.below(self.seeds.len())]);
        }
        for _ in 0..1 + rng.below(8) {
            self.mutate(rng, out);
        }
        out.truncate(self.max_len);
    }

    fn mutate(&self, rng: &mut Rng, b: &mut Vec<u8>) {
        let at = |rng: &mut Rng, b: &Vec<u8>| rng.below(b.len() + 1);
        match rng.below(11) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = at(rng, b);
                let v = rng.next() as u8;
                b.insert(i, v);
            }
            2 if !b.is_empty() => {
                let i = rng.below(b.len());
                let n = 1 + rng.below((b.len() - i).min(16));
                b.drain(i..i + n);
            }
            3 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            4 => {
                let n = at(rng, b);
                b.truncate(n);
            }
            5 if !self.seeds.is_empty() => {
                // Splice: our head, another seed's tail.
                let other = &self.seeds[rng.below(self.seeds.len())];
                let i = at(rng, b);
                let j = rng.below(other.len() + 1);
                b.truncate(i);
                b.extend_from_slice(&other[j..]);
            }
            6 => {
                let i = at(rng, b);
                let n = 1 + rng.below(32);
                let r = rng.bytes(n);
                b.splice(i..i, r);
            }
            7 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let i = at(rng, b);
                let end = (i + v.len()).min(b.len());
                if rng.chance(2) {
                    b.splice(i..end, v.iter().copied());
                } else {
                    b.splice(i..i, v.iter().copied());
                }
            }
            8 | 9 if !self.dict.is_empty() => {
                let v = &self.dict[rng.below(self.dict.len())];
                let i = at(rng, b);
                b.splice(i..i, v.iter().copied());
            }
            10 if !b.is_empty() => {
                // Repeat a slice: long runs, deep nesting.
                let i = rng.below(b.len());
                let n = 1 + rng.below((b.len() - i).min(8));
                let piece = b[i..i + n].to_vec();
                for _ in 0..1 + rng.below(64) {
                    b.splice(i..i, piece.iter().copied());
                }
            }
            _ => {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = b[i].wrapping_add(1 + rng.below(3) as u8);
                }
            }
        }
    }
}

/// FNV-1a, for crash file names.
pub fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
}

/// Cuts `data` into chunks of random sizes (1 to `max`).
pub fn chunks<'a>(rng: &mut Rng, data: &'a [u8], max: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(max)).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}
