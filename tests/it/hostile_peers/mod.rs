//! Hostile and unlucky peers: an upstream that speaks out of turn, smuggling from the
//! client side, peers that send a byte at a time, clients that leave before the answer.

mod client_gone;
mod out_of_turn;
mod slow_peers;
mod smuggling;
