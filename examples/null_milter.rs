//! The benchmark's null milter: a mail filter that lets everything through. It agrees to
//! protocol version 6 with no actions and no protocol flags, so the MTA sends it every stage
//! (connect, HELO, MAIL, RCPT, DATA, each header, end of headers, each body chunk, end of
//! message) and waits for an answer to each; it answers every one with `c` (continue).
//!
//! It puts a number on what the milter protocol itself costs the proxy: with a filter that
//! does no work, what is left is the proxy's side of the exchange. A thread per connection
//! and blocking I/O keep its own cost per packet to one read and one write.
//!
//!     cargo build --release --example null_milter
//!     target/release/examples/null_milter 127.0.0.1:10030

use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;

/// The largest packet accepted: libmilter's default 64 KiB of data and some room on top.
const MAX_PACKET: usize = 64 * 1024 + 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen] = args.as_slice() else {
        eprintln!("usage: null_milter LISTEN_ADDR");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("null_milter: {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(stream) {
                        // A peer that goes away without `Q` is normal at shutdown.
                        if e.kind() != ErrorKind::UnexpectedEof {
                            eprintln!("null_milter: {e}");
                        }
                    }
                });
            }
            Err(e) => eprintln!("null_milter: accept: {e}"),
        }
    }
    ExitCode::SUCCESS
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    // Replies are a few bytes each and the MTA waits for every one.
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let mut packet = Vec::with_capacity(MAX_PACKET);
    loop {
        let mut len = [0u8; 4];
        reader.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("packet length {len}"),
            ));
        }
        packet.resize(len, 0);
        reader.read_exact(&mut packet)?;
        match packet[0] {
            // Option negotiation: version 6, no actions, no protocol flags (so no stage is
            // skipped and every stage expects a reply).
            b'O' => {
                let mut reply = Vec::with_capacity(17);
                reply.extend_from_slice(&13u32.to_be_bytes());
                reply.push(b'O');
                reply.extend_from_slice(&6u32.to_be_bytes());
                reply.extend_from_slice(&0u32.to_be_bytes());
                reply.extend_from_slice(&0u32.to_be_bytes());
                writer.write_all(&reply)?;
                writer.flush()?;
            }
            // Macros and abort expect no reply; quit-with-new-connection keeps the
            // connection for the next message.
            b'D' | b'A' | b'K' => {}
            b'Q' => return Ok(()),
            // Connect, HELO, MAIL, RCPT, DATA, header, end of headers, body, end of
            // message, unknown command: continue.
            b'C' | b'H' | b'M' | b'R' | b'T' | b'L' | b'N' | b'B' | b'E' | b'U' => {
                writer.write_all(&[0, 0, 0, 1, b'c'])?;
                writer.flush()?;
            }
            other => {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("unknown command byte {other:#04x}"),
                ));
            }
        }
    }
}
