//! The operations on a token, through cryptoki: load the allowed module with the key file's
//! environment, find the slot (`slot-id`, or the slot whose token has the URI's `token` label),
//! log in, find the key by `id` and/or `object` label, run one RSA-OAEP operation, log out and
//! finalize.
//!
//! One operation at a time in the process (a global lock): the module's environment is set in
//! the process environment while it runs, as Go ocicrypt does, and a PKCS#11 module is
//! initialized once per process.

use std::ffi::OsString;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{shown, OaepHash, Pkcs11Config, Pkcs11Error, Pkcs11KeyFile};
use crate::redact;

static TOKEN_LOCK: Mutex<()> = Mutex::new(());

/// Restores the environment variables a key file set.
struct EnvGuard {
    saved: Vec<(String, Option<OsString>)>,
}

impl EnvGuard {
    fn set(env: &std::collections::BTreeMap<String, String>) -> Result<EnvGuard, Pkcs11Error> {
        let mut g = EnvGuard { saved: Vec::new() };
        for (k, v) in env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(Pkcs11Error::Env {
                    name: redact::token(k).into_owned(),
                });
            }
            g.saved.push((k.clone(), std::env::var_os(k)));
            std::env::set_var(k, v);
        }
        Ok(g)
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (k, v) in self.saved.drain(..).rev() {
            match v {
                Some(v) => std::env::set_var(&k, v),
                None => std::env::remove_var(&k),
            }
        }
    }
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// A cryptoki error in a line: `Login: PinIncorrect` (its `Display` is a paragraph).
pub(super) fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f}: {rv:?}"),
        other => other.to_string(),
    }
}

fn token_error(op: &str, e: &CkError) -> Pkcs11Error {
    Pkcs11Error::Token {
        op: op.to_owned(),
        reason: short(e),
    }
}

fn oaep(hash: OaepHash) -> Mechanism<'static> {
    let (h, mgf) = match hash {
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, mgf, PkcsOaepSource::empty()))
}

/// A token session with the key found, ready for one operation.
struct Opened {
    ctx: Pkcs11,
    session: Option<Session>,
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.logout();
            drop(s);
        }
        let _ = self.ctx.clone().finalize();
    }
}

fn open(
    key: &Pkcs11KeyFile,
    config: &Pkcs11Config,
    private: bool,
) -> Result<(Opened, ObjectHandle), Pkcs11Error> {
    let uri = key.uri();
    let module = uri.module(config)?;
    let pin = uri.pin()?;
    if private && pin.is_none() {
        return Err(Pkcs11Error::MissingPin);
    }
    let id = uri.path_attribute("id").map(<[u8]>::to_vec);
    let label = uri.path_attribute("object").map(<[u8]>::to_vec);
    if id.is_none() && label.is_none() {
        return Err(Pkcs11Error::Uri {
            reason: "it names no key: neither id nor object is given".into(),
        });
    }
    let slot_id = uri.slot_id()?;
    let token_label = uri.path_attribute("token").map(<[u8]>::to_vec);
    if slot_id.is_none() && token_label.is_none() {
        return Err(Pkcs11Error::Uri {
            reason: "it names no token: neither slot-id nor token is given".into(),
        });
    }

    let ctx = Pkcs11::new(&module).map_err(|e| Pkcs11Error::ModuleLoad {
        module: shown(&module),
        reason: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => {}
        Err(e) => {
            return Err(Pkcs11Error::ModuleLoad {
                module: shown(&module),
                reason: short(&e),
            })
        }
    }
    let mut opened = Opened { ctx, session: None };
    let auth = pin
        .as_ref()
        .map(|p| AuthPin::from(String::from_utf8_lossy(p).into_owned()));
    let login = |session: &Session| -> Result<(), Pkcs11Error> {
        let Some(auth) = &auth else {
            return Ok(());
        };
        match session.login(UserType::User, Some(auth)) {
            Ok(()) => Ok(()),
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
            Err(e) => Err(match rv(&e) {
                Some(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange) => {
                    Pkcs11Error::WrongPin
                }
                Some(RvError::PinLocked) => Pkcs11Error::PinLocked,
                _ => token_error("login", &e),
            }),
        }
    };
    let session = if let Some(id) = slot_id {
        let slot = Slot::try_from(id).map_err(|e| token_error("slot", &e))?;
        let s = opened.ctx.open_ro_session(slot).map_err(|e| match rv(&e) {
            Some(RvError::SlotIdInvalid | RvError::TokenNotPresent | RvError::TokenNotRecognized) => {
                Pkcs11Error::TokenNotFound {
                    token: format!("slot-id={id}"),
                }
            }
            _ => token_error("open session", &e),
        })?;
        login(&s)?;
        s
    } else {
        let want = token_label.unwrap_or_default();
        let slots = opened
            .ctx
            .get_slots_with_token()
            .map_err(|e| token_error("list slots", &e))?;
        let mut found = None;
        let mut last_err = None;
        for slot in slots {
            let Ok(info) = opened.ctx.get_token_info(slot) else {
                continue;
            };
            if info.label().as_bytes() != want.as_slice() {
                continue;
            }
            match opened.ctx.open_ro_session(slot) {
                Ok(s) => match login(&s) {
                    Ok(()) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last_err = Some(e),
                },
                Err(e) => last_err = Some(token_error("open session", &e)),
            }
        }
        match (found, last_err) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(Pkcs11Error::TokenNotFound {
                    token: redact::token(&String::from_utf8_lossy(&want)).into_owned(),
                })
            }
        }
    };
    let class = if private {
        ObjectClass::PRIVATE_KEY
    } else {
        ObjectClass::PUBLIC_KEY
    };
    let mut template = vec![Attribute::Class(class)];
    if let Some(l) = &label {
        template.push(Attribute::Label(l.clone()));
    }
    if let Some(i) = &id {
        template.push(Attribute::Id(i.clone()));
    }
    let objects = session
        .find_objects(&template)
        .map_err(|e| token_error("find the key", &e))?;
    opened.session = Some(session);
    let what = || {
        let mut parts = Vec::new();
        if let Some(l) = &label {
            parts.push(format!("object={}", redact::token(&String::from_utf8_lossy(l))));
        }
        if let Some(i) = &id {
            parts.push(format!("id={}", hex::encode(i)));
        }
        format!(
            "{} key with {}",
            if private { "private" } else { "public" },
            parts.join(" and ")
        )
    };
    match objects.as_slice() {
        [one] => Ok((opened, *one)),
        [] => Err(Pkcs11Error::KeyNotFound { what: what() }),
        more => Err(Pkcs11Error::AmbiguousKey {
            what: what(),
            count: more.len(),
        }),
    }
}

fn with_key<T>(
    key: &Pkcs11KeyFile,
    config: &Pkcs11Config,
    private: bool,
    op: impl FnOnce(&Session, ObjectHandle) -> Result<T, Pkcs11Error>,
) -> Result<T, Pkcs11Error> {
    let _lock = TOKEN_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _env = EnvGuard::set(key.env())?;
    let (opened, handle) = open(key, config, private)?;
    let session = opened.session.as_ref().ok_or(Pkcs11Error::MissingPin)?;
    op(session, handle)
}

/// RSA-OAEP encryption on the token with the public key the key file names (Go's
/// `publicEncryptOAEP`).
pub(super) fn encrypt(
    key: &Pkcs11KeyFile,
    config: &Pkcs11Config,
    hash: OaepHash,
    data: &[u8],
) -> Result<Vec<u8>, Pkcs11Error> {
    with_key(key, config, false, |s, k| {
        s.encrypt(&oaep(hash), k, data).map_err(|e| match rv(&e) {
            Some(RvError::ArgumentsBad | RvError::MechanismParamInvalid | RvError::MechanismInvalid)
                if hash == OaepHash::Sha256 =>
            {
                Pkcs11Error::Mechanism {
                    op: "encrypt".into(),
                    reason: short(&e),
                }
            }
            Some(RvError::DataLenRange) => Pkcs11Error::TooLong {
                len: data.len(),
                hash,
            },
            _ => token_error("encrypt", &e),
        })
    })
}

/// What one decryption attempt on the token found.
pub(super) enum Decrypted {
    /// The options JSON.
    Plain(Zeroizing<Vec<u8>>),
    /// This key does not open any of the blobs.
    NoMatch(Vec<String>),
}

/// Logs in once and tries every `(ciphertext, hash)` with the private key the key file names.
pub(super) fn decrypt_any(
    key: &Pkcs11KeyFile,
    config: &Pkcs11Config,
    blobs: &[(Vec<u8>, OaepHash)],
) -> Result<Decrypted, Pkcs11Error> {
    with_key(key, config, true, |s, k| {
        let mut errs = Vec::new();
        for (ct, hash) in blobs {
            match s.decrypt(&oaep(*hash), k, ct) {
                Ok(p) => return Ok(Decrypted::Plain(Zeroizing::new(p))),
                Err(e) => errs.push(format!("OAEP-{}: {}", hash.name(), short(&e))),
            }
        }
        Ok(Decrypted::NoMatch(errs))
    })
}
