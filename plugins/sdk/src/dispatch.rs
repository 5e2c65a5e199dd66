//! The dispatcher [`declare_plugin!`](crate::declare_plugin) generates: for each part a
//! plugin declares (`auth`, `routes`, `sink`), the operations of that part mapped to the
//! typed methods of its trait ([`AuthPlugin`], [`RoutesPlugin`], [`SinkPlugin`]); then the
//! plugin's own operations ([`operation`]); then an error naming the operation and every one
//! the plugin answers ([`unknown`]). Inputs are decoded with [`decode_input`] and answers
//! encoded with [`encode_answer`]: no plugin matches operation names or decodes JSON itself.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{AuthPlugin, Dispatch, RoutesPlugin, SinkPlugin, decode_input, encode_answer};

/// Decodes `input` for `op`, runs `f` and encodes its answer: one typed operation. Also the
/// form of a plugin's own operations (`declare_plugin!(P: auth, operations { "create_key" =>
/// P::create_key })`), whose input is any `Deserialize` type (an `Option` of one to accept
/// no input at all, [`decode_input`]) and whose answer any `Serialize` one (a
/// `Box<serde_json::value::RawValue>` for JSON text made already).
pub fn operation<P, I: DeserializeOwned, O: Serialize>(
    p: &mut P,
    op: &str,
    input: &[u8],
    f: impl FnOnce(&mut P, I) -> Result<O, String>,
) -> Result<Vec<u8>, String> {
    let req: I = decode_input(op, input)?;
    encode_answer(&f(p, req)?)
}

/// The error for an operation the plugin does not answer: it names the operation and lists
/// the ones the plugin answers (`connector: unknown operation "nope"; it answers
/// "authenticate", "bootstrap", …`).
pub fn unknown<P: Dispatch>(op: &str) -> String {
    let answered: Vec<String> = P::operations().iter().map(|o| format!("{o:?}")).collect();
    format!(
        "{}: unknown operation {op:?}; it answers {}",
        P::NAME,
        answered.join(", ")
    )
}

/// The operations of an auth backend ([`crate::auth`]).
pub mod auth {
    use super::*;
    use crate::auth::{OP_AUTHENTICATE, OP_BOOTSTRAP, OP_KEY_STATUS};

    pub const OPERATIONS: &[&str] = &[OP_AUTHENTICATE, OP_BOOTSTRAP, OP_KEY_STATUS];

    /// `None` when `op` is not an auth operation.
    pub fn call<P: AuthPlugin>(
        p: &mut P,
        op: &str,
        input: &[u8],
    ) -> Option<Result<Vec<u8>, String>> {
        Some(match op {
            OP_AUTHENTICATE => operation(p, op, input, P::authenticate),
            OP_BOOTSTRAP => operation(p, op, input, P::bootstrap),
            OP_KEY_STATUS => operation(p, op, input, P::key_status),
            _ => return None,
        })
    }
}

/// The operations of a plugin that serves routes ([`crate::http`]).
pub mod routes {
    use super::*;
    use crate::http::{OP_HTTP, OP_ROUTES};

    pub const OPERATIONS: &[&str] = &[OP_ROUTES, OP_HTTP];

    /// `None` when `op` is not a routes operation. `routes` takes no input (whatever is
    /// given is not read).
    pub fn call<P: RoutesPlugin>(
        p: &mut P,
        op: &str,
        input: &[u8],
    ) -> Option<Result<Vec<u8>, String>> {
        Some(match op {
            OP_ROUTES => p.routes().and_then(|r| encode_answer(&r)),
            OP_HTTP => operation(p, op, input, P::http),
            _ => return None,
        })
    }
}

/// The operations of a notification sink ([`crate::sink`]).
pub mod sink {
    use super::*;
    use crate::sink::{OP_DELIVER, OP_SCHEMES, OP_VERIFY};

    pub const OPERATIONS: &[&str] = &[OP_VERIFY, OP_DELIVER, OP_SCHEMES];

    /// `None` when `op` is not a sink operation. `schemes` takes no input (whatever is
    /// given is not read).
    pub fn call<P: SinkPlugin>(
        p: &mut P,
        op: &str,
        input: &[u8],
    ) -> Option<Result<Vec<u8>, String>> {
        Some(match op {
            OP_VERIFY => operation(p, op, input, P::verify),
            OP_DELIVER => operation(p, op, input, P::deliver),
            OP_SCHEMES => p.schemes().and_then(|r| encode_answer(&r)),
            _ => return None,
        })
    }
}
