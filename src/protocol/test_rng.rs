//! A small deterministic PRNG (xorshift64*) for the randomised tests of the protocol
//! pieces: inputs and chunk boundaries that are the same on every run, without a crate.

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Up to `max_len` bytes, each drawn from `alphabet`.
    pub(crate) fn bytes(&mut self, alphabet: &[u8], max_len: usize) -> Vec<u8> {
        let len = self.below(max_len + 1);
        (0..len)
            .map(|_| alphabet[self.below(alphabet.len())])
            .collect()
    }

    /// `rest` cut into random non-empty chunks.
    pub(crate) fn chunks<'a>(&mut self, mut rest: &'a [u8]) -> Vec<&'a [u8]> {
        let mut chunks = Vec::new();
        while !rest.is_empty() {
            let n = 1 + self.below(rest.len());
            chunks.push(&rest[..n]);
            rest = &rest[n..];
        }
        chunks
    }
}
