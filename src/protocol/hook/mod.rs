//! HTTP hooks (Stalwart's MTA Hooks, protocol version 1), sans-IO: the JSON a hook is sent
//! ([`request`]), the message contents as a JSON string written piece by piece
//! ([`json_text`]), and the hook's answer read into a verdict and milter-style
//! modifications ([`answer`]). The HTTP exchange itself is in `proxy::hook`.

pub mod answer;
pub mod json_text;
pub mod request;
