//! A seeded byte mutator for the fuzz tests (each crate's `tests/fuzz_*.rs` includes this file):
//! takes inputs from a corpus and applies a few random edits (bit flips, interesting bytes and
//! numbers, deleted, duplicated and spliced ranges, truncation), the edits coverage-guided
//! fuzzers start from. Deterministic: the same seed gives the same cases, so a failure names a
//! case that reproduces, and the CI budget is a number of cases, not a time.

#![allow(dead_code)]

/// xorshift64*: small, fast and good enough to pick edits.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bytes that break parsers more often than random ones.
const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'\n', b'\r', b' ', b'\t', b':', b'-', b'{', b'}', b'[', b']', b'"',
    b'\'', b',', b'.', b'0', b'9', b'#', b'&', b'*', b'!', b'|', b'>', b'%', b'@', b'`', b'\\',
];

/// Text that breaks number and string handling.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "18446744073709551615",
    "4294967296",
    "1e308",
    "-1e308",
    "NaN",
    ".inf",
    "-.inf",
    "null",
    "~",
    "true",
    "\"\"",
    "[]",
    "{}",
    "..",
    "../../",
    "/",
    "\u{0}",
    "\u{202e}",
    "é",
    "9223372036854775807",
    "-9223372036854775808",
    "0.0000001",
    "&a",
    "*a",
    "!!binary",
];

/// One mutant of `input`: 1 to 8 edits; `other` is spliced from.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = out.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                out.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16.min(len - a))).min(len);
                out.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64.min(len - a))).min(len);
                let chunk = out[a..b].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                let a = rng.below(other.len());
                let b = (a + 1 + rng.below(128.min(other.len() - a))).min(other.len());
                let at = rng.below(len + 1);
                let end = (at + (b - a)).min(len);
                out.splice(at..end, other[a..b].iter().copied());
            }
            6 if len > 0 => out.truncate(rng.below(len)),
            7 if len >= 4 => {
                // A 4-byte little-endian field set to an extreme.
                let i = rng.below(len - 3);
                let v: u32 = [0, 1, u32::MAX, 0x8000_0000, 0x7fff_ffff][rng.below(5)];
                out[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next() as u8;
            }
            _ => out.push(rng.next() as u8),
        }
    }
    out
}

/// The files of `dir`, sorted by name (the corpus).
pub fn corpus(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// How many cases a fuzz test runs: `default` (the CI budget), or `SEGPROP_FUZZ_CASES` for a
/// longer local run.
pub fn cases(default: usize) -> usize {
    std::env::var("SEGPROP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on `cases` mutants of the corpus entries (and on each entry as it is),
/// catching panics: a panic fails the test naming the case's seed and writes the input next to
/// the test's temp files for a look.
pub fn fuzz(seeds: &[(String, Vec<u8>)], cases: usize, seed: u64, mut check: impl FnMut(&[u8])) {
    assert!(!seeds.is_empty(), "an empty corpus");
    let mut run = |what: &str, input: &[u8]| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let saved = std::env::temp_dir().join(format!("segprop-fuzz-{seed}-{what}.bin"));
            let _ = std::fs::write(&saved, input);
            panic!(
                "{what} panicked: {message}\ninput ({} bytes) saved to {}:\n{}",
                input.len(),
                saved.display(),
                String::from_utf8_lossy(&input[..input.len().min(2000)])
            );
        }
    };
    for (name, input) in seeds {
        run(&format!("corpus entry {name}"), input);
    }
    let mut rng = Rng::new(seed);
    for case in 0..cases {
        let (_, a) = &seeds[rng.below(seeds.len())];
        let (_, b) = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, a, b);
        run(&format!("case {case} of seed {seed}"), &input);
    }
}
