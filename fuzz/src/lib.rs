//! Helpers shared by the fuzz targets.

/// Small deterministic PRNG (xorshift64*): chunk boundaries derived from the fuzz input, so
/// a crash reproduces from the saved input alone.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // xorshift must not start at zero.
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `data` cut into random non-empty chunks, mostly short so that every state boundary
    /// gets crossed, sometimes long.
    pub fn chunks<'a>(&mut self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut chunks = Vec::new();
        while !data.is_empty() {
            let max = if self.below(4) == 0 { data.len() } else { 4 };
            let n = 1 + self.below(max.min(data.len()));
            chunks.push(&data[..n]);
            data = &data[n..];
        }
        chunks
    }
}

/// Splits a fuzz input into a seed (its first 8 bytes, fewer when short) and the rest.
pub fn seed_and_rest(data: &[u8]) -> (u64, &[u8]) {
    let n = data.len().min(8);
    let mut seed = [0u8; 8];
    seed[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(seed), &data[n..])
}

/// Content with every line end (CRLF, bare LF, bare CR) made CRLF and a final unterminated
/// line terminated: what the receiver yields for the encoder's output.
pub fn normalise(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 2);
    let mut i = 0;
    let mut line_open = false;
    while i < content.len() {
        match content[i] {
            b'\r' | b'\n' => {
                if content[i] == b'\r' && content.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                out.extend_from_slice(b"\r\n");
                line_open = false;
            }
            b => {
                out.push(b);
                line_open = true;
            }
        }
        i += 1;
    }
    if line_open {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Whether every CR is followed by LF and every LF preceded by CR.
pub fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}
