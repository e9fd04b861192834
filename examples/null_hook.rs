//! The benchmark's null HTTP hook: an MTA Hooks endpoint that lets everything through. It
//! reads each POSTed request whole and answers `{"action":"accept"}`, over HTTP/1.1 with
//! keep-alive, so what is left of a hook's cost is the proxy's side of the exchange: the
//! request's JSON, the HTTP client, its connection pool and the answer's parsing.
//!
//! `--delay-ms N` waits N ms before each answer (a timer, never a blocked thread: any number
//! of requests wait at once), a stand-in for a hook that takes its time, to see whether the
//! proxy keeps as many calls in flight as it may. `--jitter-ms J` makes each wait a random
//! one between N - J and N + J ms (the same mean), as a real service's answers vary: with a
//! fixed wait, sessions started together stay together, and their work after the answer
//! arrives all at once.
//!
//!     cargo build --release --example null_hook
//!     target/release/examples/null_hook --listen 127.0.0.1:10080 [--delay-ms 50] [--jitter-ms 25]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[path = "support/wait.rs"]
mod wait;
use wait::Wait;

const ACCEPT: &str = "{\"action\":\"accept\"}";

fn usage() -> ExitCode {
    eprintln!("usage: null_hook [--listen ADDR] [--delay-ms N] [--jitter-ms J]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 10080).into();
    let mut delay = Duration::ZERO;
    let mut jitter = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--listen", Some(v)) => match v.parse() {
                Ok(a) => listen = a,
                Err(e) => {
                    eprintln!("null_hook: --listen {v}: {e}");
                    return usage();
                }
            },
            ("--delay-ms", Some(v)) => match wait::millis("--delay-ms", &v) {
                Ok(d) => delay = d,
                Err(e) => {
                    eprintln!("null_hook: {e}");
                    return usage();
                }
            },
            ("--jitter-ms", Some(v)) => match wait::millis("--jitter-ms", &v) {
                Ok(d) => jitter = d,
                Err(e) => {
                    eprintln!("null_hook: {e}");
                    return usage();
                }
            },
            _ => return usage(),
        }
    }
    if jitter > delay {
        eprintln!("null_hook: --jitter-ms must not exceed --delay-ms");
        return usage();
    }
    // One thread: the work per request is small, and on a machine whose cores also run
    // the load, the proxy and the sink, a second worker would mostly add wake-ups.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("null_hook: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(listen, Wait { delay, jitter })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("null_hook: {listen}: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(listen: SocketAddr, wait: Wait) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors and the like: the next accept may do better.
            Err(e) => {
                eprintln!("null_hook: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, wait.next()));
            // A client that goes away ends its connection; nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>, delay: Duration) -> Result<Response<String>, hyper::Error> {
    if req.method() != Method::POST {
        let mut refused = Response::new(String::new());
        *refused.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return Ok(refused);
    }
    // The whole request is read, as a real hook would, so the proxy's sending is measured
    // to its end (and the connection is left clean for the next request).
    let mut body = req.into_body();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        frame?;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::new(ACCEPT.to_string());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
