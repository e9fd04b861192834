//! The MTA side of the milter protocol (the Sendmail/Postfix mail filter protocol, version
//! 6), sans-IO: commands encoded to bytes, the filter's bytes decoded into packets and typed
//! replies, and a per-connection state machine that says what to send at each stage and
//! what the filter's answer means.
//!
//! - [`codec`]: packet framing (`PacketDecoder`), the commands the MTA sends (`Command`),
//!   body chunking.
//! - [`reply`]: the filter's replies parsed into `Reply` (verdicts, modifications, progress).
//! - [`negotiate`]: option negotiation (`Offer`, `Negotiated`) and macro lists per stage.
//! - [`session`]: `MilterSession`, one filter connection driven stage by stage.
//! - [`message`]: the message's header fields as milters see them, and the header and
//!   envelope modifications applied.
//!
//! Constant names follow sendmail's libmilter (`mfdef.h`) so they can be looked up there.
pub mod codec;
pub mod message;
pub mod negotiate;
pub mod reply;
pub mod session;

use std::fmt;

/// The protocol version this side speaks and offers.
pub const PROTOCOL_VERSION: u32 = 6;
/// The largest body chunk one `SMFIC_BODY` packet carries (`MILTER_CHUNK_SIZE`).
pub const MAX_BODY_CHUNK: usize = 65535;

/// Commands, MTA to filter (`SMFIC_*`).
pub mod cmd {
    pub const ABORT: u8 = b'A';
    pub const BODY: u8 = b'B';
    pub const CONNECT: u8 = b'C';
    pub const MACRO: u8 = b'D';
    pub const BODYEOB: u8 = b'E';
    pub const HELO: u8 = b'H';
    pub const QUIT_NC: u8 = b'K';
    pub const HEADER: u8 = b'L';
    pub const MAIL: u8 = b'M';
    pub const EOH: u8 = b'N';
    pub const OPTNEG: u8 = b'O';
    pub const QUIT: u8 = b'Q';
    pub const RCPT: u8 = b'R';
    pub const DATA: u8 = b'T';
    pub const UNKNOWN: u8 = b'U';
}

/// Replies, filter to MTA (`SMFIR_*`), plus `SMFIC_OPTNEG` which the filter echoes.
pub mod rsp {
    pub const ADDRCPT: u8 = b'+';
    pub const DELRCPT: u8 = b'-';
    pub const ADDRCPT_PAR: u8 = b'2';
    pub const SHUTDOWN: u8 = b'4';
    pub const ACCEPT: u8 = b'a';
    pub const REPLBODY: u8 = b'b';
    pub const CONTINUE: u8 = b'c';
    pub const DISCARD: u8 = b'd';
    pub const CHGFROM: u8 = b'e';
    pub const CONN_FAIL: u8 = b'f';
    pub const ADDHEADER: u8 = b'h';
    pub const INSHEADER: u8 = b'i';
    pub const SETSYMLIST: u8 = b'l';
    pub const CHGHEADER: u8 = b'm';
    pub const PROGRESS: u8 = b'p';
    pub const QUARANTINE: u8 = b'q';
    pub const REJECT: u8 = b'r';
    pub const SKIP: u8 = b's';
    pub const TEMPFAIL: u8 = b't';
    pub const REPLYCODE: u8 = b'y';
    pub const OPTNEG: u8 = b'O';

    /// Every command byte a filter may send.
    pub const ALL: &[u8] = &[
        ADDRCPT,
        DELRCPT,
        ADDRCPT_PAR,
        SHUTDOWN,
        ACCEPT,
        REPLBODY,
        CONTINUE,
        DISCARD,
        CHGFROM,
        CONN_FAIL,
        ADDHEADER,
        INSHEADER,
        SETSYMLIST,
        CHGHEADER,
        PROGRESS,
        QUARANTINE,
        REJECT,
        SKIP,
        TEMPFAIL,
        REPLYCODE,
        OPTNEG,
    ];
}

/// Actions a filter may take at end of message (`SMFIF_*`).
pub mod action {
    pub const ADDHDRS: u32 = 0x01;
    pub const CHGBODY: u32 = 0x02;
    pub const ADDRCPT: u32 = 0x04;
    pub const DELRCPT: u32 = 0x08;
    pub const CHGHDRS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    pub const CHGFROM: u32 = 0x40;
    pub const ADDRCPT_PAR: u32 = 0x80;
    pub const SETSYMLIST: u32 = 0x100;
    /// Everything above: what this side offers.
    pub const ALL: u32 = 0x1ff;
}

/// Protocol flags (`SMFIP_*`): stages the filter does not want (`NO*`), stages it will not
/// answer (`NR_*`), and protocol extensions.
pub mod proto {
    pub const NOCONNECT: u32 = 0x01;
    pub const NOHELO: u32 = 0x02;
    pub const NOMAIL: u32 = 0x04;
    pub const NORCPT: u32 = 0x08;
    pub const NOBODY: u32 = 0x10;
    pub const NOHDRS: u32 = 0x20;
    pub const NOEOH: u32 = 0x40;
    /// No reply to each header (also known as `SMFIP_NOHREPL`).
    pub const NR_HDR: u32 = 0x80;
    pub const NOUNKNOWN: u32 = 0x100;
    pub const NODATA: u32 = 0x200;
    /// The filter may answer a body chunk with `SMFIR_SKIP`.
    pub const SKIP: u32 = 0x400;
    /// The filter also wants recipients the MTA rejected.
    pub const RCPT_REJ: u32 = 0x800;
    pub const NR_CONN: u32 = 0x1000;
    pub const NR_HELO: u32 = 0x2000;
    pub const NR_MAIL: u32 = 0x4000;
    pub const NR_RCPT: u32 = 0x8000;
    pub const NR_DATA: u32 = 0x10000;
    pub const NR_UNKN: u32 = 0x20000;
    pub const NR_EOH: u32 = 0x40000;
    pub const NR_BODY: u32 = 0x80000;
    /// Header values are sent with their leading space.
    pub const HDR_LEADSPC: u32 = 0x100000;
    /// Everything above: what this side offers. (`SMFIP_MDS_*`, larger data sizes, are
    /// not offered.)
    pub const ALL: u32 = 0x1f_ffff;
}

/// Macro stages of `SMFIR_SETSYMLIST` lists (`SMFIM_*`).
pub mod macro_stage {
    pub const CONNECT: u32 = 0;
    pub const HELO: u32 = 1;
    pub const ENVFROM: u32 = 2;
    pub const ENVRCPT: u32 = 3;
    pub const DATA: u32 = 4;
    pub const EOM: u32 = 5;
    pub const EOH: u32 = 6;
}

/// A stage of the conversation: each one is a command the MTA sends and (unless the filter
/// negotiated otherwise) answers it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Header,
    Eoh,
    Body,
    /// End of message (`SMFIC_BODYEOB`): modifications, then the final verdict.
    Eom,
    /// An SMTP command the MTA did not recognise.
    Unknown,
}

impl Stage {
    /// The stage's name in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Header => "header",
            Stage::Eoh => "eoh",
            Stage::Body => "body",
            Stage::Eom => "eom",
            Stage::Unknown => "unknown",
        }
    }

    /// The command byte that starts this stage.
    pub fn command(self) -> u8 {
        match self {
            Stage::Connect => cmd::CONNECT,
            Stage::Helo => cmd::HELO,
            Stage::Mail => cmd::MAIL,
            Stage::Rcpt => cmd::RCPT,
            Stage::Data => cmd::DATA,
            Stage::Header => cmd::HEADER,
            Stage::Eoh => cmd::EOH,
            Stage::Body => cmd::BODY,
            Stage::Eom => cmd::BODYEOB,
            Stage::Unknown => cmd::UNKNOWN,
        }
    }

    /// The `SMFIP_NO*` flag with which a filter opts out of this stage (none for EOM).
    pub fn no_flag(self) -> u32 {
        match self {
            Stage::Connect => proto::NOCONNECT,
            Stage::Helo => proto::NOHELO,
            Stage::Mail => proto::NOMAIL,
            Stage::Rcpt => proto::NORCPT,
            Stage::Data => proto::NODATA,
            Stage::Header => proto::NOHDRS,
            Stage::Eoh => proto::NOEOH,
            Stage::Body => proto::NOBODY,
            Stage::Eom => 0,
            Stage::Unknown => proto::NOUNKNOWN,
        }
    }

    /// The `SMFIP_NR_*` flag with which a filter says it will not answer (none for EOM).
    pub fn no_reply_flag(self) -> u32 {
        match self {
            Stage::Connect => proto::NR_CONN,
            Stage::Helo => proto::NR_HELO,
            Stage::Mail => proto::NR_MAIL,
            Stage::Rcpt => proto::NR_RCPT,
            Stage::Data => proto::NR_DATA,
            Stage::Header => proto::NR_HDR,
            Stage::Eoh => proto::NR_EOH,
            Stage::Body => proto::NR_BODY,
            Stage::Eom => 0,
            Stage::Unknown => proto::NR_UNKN,
        }
    }

    /// The `SMFIM_*` macro stage whose list applies, for the stages that send macros.
    pub fn macro_stage(self) -> Option<u32> {
        match self {
            Stage::Connect => Some(macro_stage::CONNECT),
            Stage::Helo => Some(macro_stage::HELO),
            Stage::Mail => Some(macro_stage::ENVFROM),
            Stage::Rcpt => Some(macro_stage::ENVRCPT),
            Stage::Data => Some(macro_stage::DATA),
            Stage::Eoh => Some(macro_stage::EOH),
            Stage::Eom => Some(macro_stage::EOM),
            Stage::Header | Stage::Body | Stage::Unknown => None,
        }
    }
}

/// Why the filter's bytes or answers cannot be used. After one of these the connection to
/// the filter is unusable: the caller closes it and applies its default action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A packet whose length field is zero (there is not even a command byte).
    ZeroLength,
    /// A packet longer than the limit for its command; nothing of it was buffered.
    Oversize {
        command: u8,
        length: usize,
        limit: usize,
    },
    /// A command byte no filter sends.
    UnknownCommand(u8),
    /// A packet whose data does not have the shape its command requires.
    Malformed { command: u8, reason: &'static str },
    /// An `SMFIR_REPLYCODE` that is not a valid 4xx/5xx SMTP reply.
    BadReplyCode,
    /// A filter protocol version this side cannot speak.
    UnsupportedVersion(u32),
    /// The filter asked for actions (`SMFIF_*`) that were not offered.
    ActionsNotOffered { requested: u32, offered: u32 },
    /// The filter asked for protocol flags (`SMFIP_*`) that were not offered.
    FlagsNotOffered { requested: u32, offered: u32 },
    /// A reply that is not valid at this point of the conversation.
    Unexpected { command: u8, stage: Option<Stage> },
    /// A modification (or skip) the filter did not negotiate.
    NotNegotiated { command: u8 },
    /// The session already failed or was closed: nothing more is accepted.
    Closed,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |b: &u8| char::from(*b).escape_default().to_string();
        match self {
            ProtocolError::ZeroLength => write!(f, "packet of length zero"),
            ProtocolError::Oversize {
                command,
                length,
                limit,
            } => write!(
                f,
                "packet '{}' of {length} bytes exceeds the limit of {limit}",
                c(command)
            ),
            ProtocolError::UnknownCommand(b) => write!(f, "unknown reply command '{}'", c(b)),
            ProtocolError::Malformed { command, reason } => {
                write!(f, "malformed '{}' packet: {reason}", c(command))
            }
            ProtocolError::BadReplyCode => write!(f, "malformed SMTP reply in reply code packet"),
            ProtocolError::UnsupportedVersion(v) => write!(f, "unsupported filter version {v}"),
            ProtocolError::ActionsNotOffered { requested, offered } => write!(
                f,
                "filter requests actions 0x{requested:x}, offered 0x{offered:x}"
            ),
            ProtocolError::FlagsNotOffered { requested, offered } => write!(
                f,
                "filter requests protocol flags 0x{requested:x}, offered 0x{offered:x}"
            ),
            ProtocolError::Unexpected { command, stage } => match stage {
                Some(s) => write!(f, "reply '{}' not valid at stage {s:?}", c(command)),
                None => write!(f, "reply '{}' while no answer was expected", c(command)),
            },
            ProtocolError::NotNegotiated { command } => {
                write!(f, "reply '{}' was not negotiated", c(command))
            }
            ProtocolError::Closed => write!(f, "filter connection already failed or closed"),
        }
    }
}

impl std::error::Error for ProtocolError {}
