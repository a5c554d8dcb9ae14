//! The emulator's HTTP server: routing, IAM, key store, crypto, faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use axum::body::Body;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::time::{now_rfc3339, now_unix};
use super::{record, Fault, KeyRec, Op, RequestRecord, Shared, Version};
use keyprotect_client::b64;

const ENVELOPE_VERSION: &str = "4.0.0";
const BODY_LIMIT: usize = 1 << 20;

#[derive(Debug)]
pub(super) struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault injection: connection dropped")
    }
}

impl std::error::Error for DropConnection {}

pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    shared.lock().connections += 1;
                    let sh = shared.clone();
                    let tls = tls.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let sh = sh.clone();
                            async move { handle(sh, req).await }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            None => {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                            Some(acceptor) => {
                                let accept = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                                if let Ok(Ok(s)) = accept.await {
                                    let _ = http.serve_connection(TokioIo::new(s), svc).await;
                                }
                            }
                        }
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
    conns.abort_all();
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(sh: &Arc<Shared>) -> Self {
        let mut s = sh.lock();
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        Self(sh.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, DropConnection> {
    let _in_flight = InFlight::enter(&sh);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    if uri.path().starts_with("/_emulator/") {
        let body = axum::body::to_bytes(Body::new(req.into_body()), BODY_LIMIT)
            .await
            .unwrap_or_default();
        return Ok(admin(&sh, &method, uri.path(), &body));
    }
    let (op, key) = classify(&method, uri.path(), uri.query());
    let correlation_id = header_str(&headers, "correlation-id");
    let mut rec = RequestRecord {
        op,
        method: method.to_string(),
        path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        key: key.clone(),
        status: 0,
        correlation_id: correlation_id.clone(),
        content_type: header_str(&headers, "content-type"),
    };
    let fault = {
        let mut s = sh.lock();
        *s.counts.entry(op).or_default() += 1;
        let i = s
            .faults
            .iter()
            .position(|f| f.remaining > 0 && f.op.is_none_or(|o| o == op));
        i.map(|i| {
            s.faults[i].remaining -= 1;
            let f = s.faults[i].fault.clone();
            if s.faults[i].remaining == 0 {
                s.faults.remove(i);
            }
            f
        })
    };
    let mut resp = None;
    match fault {
        Some(Fault::Drop) => {
            record(&mut sh.lock(), rec);
            return Err(DropConnection);
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::TooManyRequests { retry_after }) => {
            let mut r = kp_error(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests: Please wait a few minutes and try again.",
                "TOO_MANY_REQUESTS_ERR",
                "Too many requests",
                None,
            );
            if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                r.headers_mut().insert(RETRY_AFTER, v);
            }
            resp = Some(r);
        }
        Some(Fault::ServerError(code)) => {
            let st = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            resp = Some(kp_error(
                st,
                &format!(
                    "{}: The service is temporarily unavailable (injected fault)",
                    st.canonical_reason().unwrap_or("Error")
                ),
                "INTERNAL_SERVER_ERR",
                "Internal server error",
                None,
            ));
        }
        Some(Fault::Unauthorized) => resp = Some(unauthorized()),
        None => {}
    }
    let mut resp = match resp {
        Some(r) => r,
        None => {
            let body = match axum::body::to_bytes(Body::new(req.into_body()), BODY_LIMIT).await {
                Ok(b) => b,
                Err(_) => {
                    let r = kp_error(
                        StatusCode::BAD_REQUEST,
                        "Bad Request: the body could not be read or is larger than 1 MiB",
                        "BAD_BODY_ERR",
                        "Invalid body",
                        None,
                    );
                    rec.status = r.status().as_u16();
                    record(&mut sh.lock(), rec);
                    return Ok(r);
                }
            };
            route(&sh, op, key.as_deref(), &method, uri.query(), &headers, &body)
        }
    };
    let corr = correlation_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if let Ok(v) = HeaderValue::from_str(&corr) {
        resp.headers_mut().insert("correlation-id", v);
    }
    rec.status = resp.status().as_u16();
    record(&mut sh.lock(), rec);
    Ok(resp)
}

/// Percent-decodes a path segment or query value (invalid escapes stay as they are).
fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn query_param(q: Option<&str>, name: &str) -> Option<String> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name && !v.is_empty()).then(|| pct_decode(&v.replace('+', " ")))
    })
}

fn classify(method: &Method, path: &str, query: Option<&str>) -> (Op, Option<String>) {
    let p = path.trim_end_matches('/');
    if *method == Method::POST && (p.ends_with("/identity/token") || p.ends_with("/oidc/token")) {
        return (Op::Token, None);
    }
    let Some(rest) = p.strip_prefix("/api/v2/keys") else {
        return (Op::Other, None);
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segs.as_slice()) {
        (&Method::GET | &Method::HEAD, []) => (Op::ListKeys, None),
        (&Method::POST, []) => (Op::CreateKey, None),
        (m, [id]) => {
            let id = Some(pct_decode(id));
            match *m {
                Method::GET => (Op::GetKey, id),
                Method::DELETE => (Op::Delete, id),
                Method::POST => match query_param(query, "action").as_deref() {
                    Some(a) => (action_op(a), id),
                    None => (Op::Other, id),
                },
                _ => (Op::Other, id),
            }
        }
        (&Method::GET, [id, "metadata"]) => (Op::GetKeyMetadata, Some(pct_decode(id))),
        (&Method::GET, [id, "versions"]) => (Op::ListKeyVersions, Some(pct_decode(id))),
        (&Method::POST, [id, "restore"]) => (Op::Restore, Some(pct_decode(id))),
        (&Method::POST, [id, "actions", a]) => (action_op(a), Some(pct_decode(id))),
        _ => (Op::Other, None),
    }
}

fn action_op(a: &str) -> Op {
    match a {
        "wrap" => Op::Wrap,
        "unwrap" => Op::Unwrap,
        "rewrap" => Op::Rewrap,
        "rotate" => Op::Rotate,
        "disable" => Op::Disable,
        "enable" => Op::Enable,
        "restore" => Op::Restore,
        _ => Op::Other,
    }
}

fn json_resp(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).expect("json")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn no_content() -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn kp_error(
    status: StatusCode,
    msg: &str,
    code: &str,
    reason: &str,
    target: Option<(&str, &str)>,
) -> Response<Body> {
    let mut reason_v = json!({
        "code": code,
        "message": reason,
        "status": status.as_u16(),
        "moreInfo": "https://cloud.ibm.com/apidocs/key-protect",
    });
    if let Some((t, n)) = target {
        reason_v["target"] = json!({ "type": t, "name": n });
    }
    json_resp(
        status,
        &json!({
            "metadata": { "collectionType": "application/vnd.ibm.kms.error+json", "collectionTotal": 1 },
            "resources": [ { "errorMsg": format!("{msg}. Please see `reasons` for more details."), "reasons": [reason_v] } ],
        }),
    )
}

fn unauthorized() -> Response<Body> {
    kp_error(
        StatusCode::UNAUTHORIZED,
        "Unauthorized: The user does not have access to the specified resource",
        "UNAUTHORIZED_ERR",
        "The user does not have access to the specified resource",
        None,
    )
}

fn not_found() -> Response<Body> {
    kp_error(
        StatusCode::NOT_FOUND,
        "Not Found: Key could not be found",
        "NOT_FOUND_ERR",
        "Key does not exist",
        Some(("param", "id")),
    )
}

fn bad_field(field: &str, what: &str) -> Response<Body> {
    kp_error(
        StatusCode::BAD_REQUEST,
        &format!("Bad Request: The field `{field}` must be: {what}"),
        "INVALID_FIELD_ERR",
        &format!("The field `{field}` must be: {what}"),
        Some(("field", field)),
    )
}

fn state_error(state: i64) -> Response<Body> {
    if state == 5 {
        kp_error(
            StatusCode::GONE,
            "Gone: The key has been deleted and is no longer available",
            "KEY_DELETED_ERR",
            "The key has been deleted",
            None,
        )
    } else {
        kp_error(
            StatusCode::CONFLICT,
            "Conflict: Key is not in active state",
            "KEY_ACTION_INVALID_STATE_ERR",
            "Key is not in a valid state",
            None,
        )
    }
}

fn iam_error(status: StatusCode, code: &str, msg: &str) -> Response<Body> {
    json_resp(
        status,
        &json!({
            "errorCode": code,
            "errorMessage": msg,
            "context": { "requestId": uuid::Uuid::new_v4().to_string(), "requestType": "incoming.Identity_Token" },
        }),
    )
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The admin API for non-Rust users of the `kp-emulator` binary (no auth; loopback only).
fn admin(sh: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    #[derive(Deserialize)]
    struct FaultReq {
        #[serde(default)]
        op: Option<String>,
        fault: String,
        #[serde(default)]
        retry_after: Option<String>,
        #[serde(default)]
        delay_ms: Option<u64>,
        #[serde(default = "one")]
        times: u32,
    }
    fn one() -> u32 {
        1
    }
    #[derive(Deserialize)]
    struct StateReq {
        state: i64,
    }
    let bad = |m: String| json_resp(StatusCode::BAD_REQUEST, &json!({ "error": m }));
    let segs: Vec<&str> = path
        .trim_start_matches("/_emulator/")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match (method, segs.as_slice()) {
        (&Method::POST, ["faults"]) => {
            let f: FaultReq = match serde_json::from_slice(body) {
                Ok(f) => f,
                Err(e) => {
                    return bad(format!(
                        "expected {{\"op\", \"fault\", \"times\", \"retry_after\", \"delay_ms\"}}: {e}"
                    ))
                }
            };
            let op = match f.op.as_deref() {
                None | Some("any") => None,
                Some(n) => match Op::from_name(n) {
                    Some(o) => Some(o),
                    None => return bad(format!("unknown op {n:?}")),
                },
            };
            let fault = match f.fault.as_str() {
                "429" => Fault::TooManyRequests {
                    retry_after: f.retry_after,
                },
                "401" => Fault::Unauthorized,
                "drop" => Fault::Drop,
                "slow" => Fault::Slow(Duration::from_millis(f.delay_ms.unwrap_or(1000))),
                code => match code.parse::<u16>() {
                    Ok(c) if (500..600).contains(&c) => Fault::ServerError(c),
                    _ => return bad(format!("unknown fault {code:?}: use 429, 401, 5xx, slow or drop")),
                },
            };
            if f.times > 0 {
                sh.lock().faults.push(super::FaultRule {
                    op,
                    fault,
                    remaining: f.times,
                });
            }
            no_content()
        }
        (&Method::DELETE, ["faults"]) => {
            sh.lock().faults.clear();
            no_content()
        }
        (&Method::GET, ["counts"]) => {
            let s = sh.lock();
            let m: serde_json::Map<String, Value> = s
                .counts
                .iter()
                .map(|(o, n)| (o.name().to_owned(), json!(n)))
                .collect();
            json_resp(StatusCode::OK, &Value::Object(m))
        }
        (&Method::POST, ["reset"]) => {
            let mut s = sh.lock();
            s.counts.clear();
            s.log.clear();
            s.unwraps_by_ciphertext.clear();
            s.faults.clear();
            no_content()
        }
        (&Method::POST, ["keys"]) => {
            #[derive(Deserialize)]
            struct NewKey {
                name: String,
            }
            match serde_json::from_slice::<NewKey>(body) {
                Ok(k) => json_resp(
                    StatusCode::CREATED,
                    &json!({ "id": create_key_direct(sh, &k.name, false, None, Vec::new()) }),
                ),
                Err(e) => bad(format!("expected {{\"name\"}}: {e}")),
            }
        }
        (&Method::POST, ["keys", id, "rotate"]) => match rotate_direct(sh, id) {
            Some(v) => json_resp(StatusCode::OK, &json!({ "version": v })),
            None => not_found(),
        },
        (&Method::POST, ["keys", id, "state"]) => {
            let Ok(r) = serde_json::from_slice::<StateReq>(body) else {
                return bad("expected {\"state\": 1|2|3|5}".into());
            };
            if !matches!(r.state, 1 | 2 | 3 | 5) {
                return bad("state must be 1, 2, 3 or 5".into());
            }
            let mut s = sh.lock();
            match s.keys.get_mut(*id) {
                Some(k) => {
                    k.state = r.state;
                    k.updated = now_rfc3339();
                    if r.state == 5 {
                        k.deleted = Some(k.updated.clone());
                    }
                    no_content()
                }
                None => not_found(),
            }
        }
        (&Method::POST, ["tokens", "revoke"]) => {
            sh.lock().tokens.clear();
            no_content()
        }
        _ => json_resp(
            StatusCode::NOT_FOUND,
            &json!({ "error": "admin API: POST faults, DELETE faults, GET counts, POST reset, POST keys, POST keys/{id}/rotate, POST keys/{id}/state, POST tokens/revoke" }),
        ),
    }
}

fn route(
    sh: &Shared,
    op: Op,
    key: Option<&str>,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<Body> {
    if op == Op::Token {
        return token(sh, body);
    }
    if op == Op::Other && key.is_none() {
        return kp_error(
            StatusCode::NOT_FOUND,
            "Not Found: no such API path",
            "NOT_FOUND_ERR",
            "Unknown path",
            None,
        );
    }
    // Header checks.
    let auth = header_str(headers, "authorization").unwrap_or_default();
    let tok = auth
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    {
        let s = sh.lock();
        let ok = tok
            .as_ref()
            .and_then(|t| s.tokens.get(t))
            .is_some_and(|exp| Instant::now() < *exp);
        if !ok {
            return unauthorized();
        }
    }
    match header_str(headers, "bluemix-instance") {
        None => {
            return kp_error(
                StatusCode::BAD_REQUEST,
                "Bad Request: The bluemix-instance header is missing",
                "BAD_HEADER_ERR",
                "The header `bluemix-instance` must be: a valid instance id",
                Some(("header", "bluemix-instance")),
            )
        }
        Some(i) if i.trim() != sh.config.instance_id => return unauthorized(),
        Some(_) => {}
    }
    match op {
        Op::ListKeys => list(sh, method, query),
        Op::CreateKey => create(sh, body),
        Op::Other => kp_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: unsupported action",
            "BAD_ACTION_ERR",
            "The action is not supported by the emulator",
            None,
        ),
        _ => {
            let key = key.unwrap_or_default();
            if op == Op::ListKeyVersions {
                let all = query_param(query, "allKeyStates").is_some_and(|v| v.eq_ignore_ascii_case("true"));
                return versions(sh, key, all);
            }
            let prefer_repr =
                header_str(headers, "prefer").is_some_and(|p| p.contains("return=representation"));
            key_op(sh, op, key, body, prefer_repr)
        }
    }
}

fn token(sh: &Shared, body: &[u8]) -> Response<Body> {
    let form = String::from_utf8_lossy(body);
    let get = |n: &str| query_param(Some(&form), n);
    if get("grant_type").as_deref() != Some("urn:ibm:params:oauth:grant-type:apikey") {
        return iam_error(
            StatusCode::BAD_REQUEST,
            "BXNIM0109E",
            "Property missing or empty. Operation not supported for grant type.",
        );
    }
    let Some(apikey) = get("apikey").map(Zeroizing::new).filter(|k| !k.is_empty()) else {
        return iam_error(
            StatusCode::BAD_REQUEST,
            "BXNIM0103E",
            "Property apikey missing or empty.",
        );
    };
    if !sh.config.api_keys.iter().any(|k| k.as_str() == apikey.as_str()) {
        return iam_error(
            StatusCode::BAD_REQUEST,
            "BXNIM0415E",
            "Provided API key could not be found.",
        );
    }
    let mut s = sh.lock();
    let ttl = s.token_ttl;
    let now = now_unix();
    let exp = now + ttl.as_secs().max(1);
    let mut sig = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut sig);
    let jwt = format!(
        "{}.{}.{}",
        b64url(br#"{"kid":"kp-emulator","alg":"RS256"}"#),
        b64url(
            json!({
                "iam_id": "iam-ServiceId-kp-emulator",
                "id": "iam-ServiceId-kp-emulator",
                "sub": "ServiceId-kp-emulator",
                "sub_type": "ServiceId",
                "grant_type": "urn:ibm:params:oauth:grant-type:apikey",
                "iat": now,
                "exp": exp,
                "iss": "https://iam.cloud.ibm.com/identity",
                "jti": uuid::Uuid::new_v4().to_string(),
            })
            .to_string()
            .as_bytes()
        ),
        b64url(&sig)
    );
    let deadline = Instant::now() + ttl.max(Duration::from_millis(1));
    s.tokens.retain(|_, e| *e > Instant::now());
    s.tokens.insert(jwt.clone(), deadline);
    json_resp(
        StatusCode::OK,
        &json!({
            "access_token": jwt,
            "refresh_token": "not_supported",
            "ims_user_id": 1,
            "token_type": "Bearer",
            "expires_in": ttl.as_secs().max(1),
            "expiration": exp,
            "scope": "ibm openid",
        }),
    )
}

fn key_json(k: &KeyRec, instance: &str, with_payload: bool) -> Value {
    let latest = k.versions.last();
    let mut v = json!({
        "type": "application/vnd.ibm.kms.key+json",
        "id": k.id,
        "name": k.name,
        "aliases": k.aliases,
        "state": k.state,
        "extractable": k.extractable,
        "imported": k.imported,
        "crn": format!("crn:v1:bluemix:public:kms:local:a/kp-emulator:{instance}:key:{}", k.id),
        "creationDate": k.created,
        "createdBy": "IBMid-kp-emulator",
        "lastUpdateDate": k.updated,
        "keyRingID": "default",
        "deleted": k.state == 5,
        "dualAuthDelete": { "enabled": false },
        "algorithmType": "AES",
        "algorithmMetadata": { "bitLength": "256", "mode": "GCM" },
    });
    if let Some(d) = &k.description {
        v["description"] = json!(d);
    }
    if let Some(r) = &k.rotated {
        v["lastRotateDate"] = json!(r);
    }
    if let Some(d) = &k.deleted {
        v["deletionDate"] = json!(d);
    }
    if let Some(l) = latest {
        v["keyVersion"] = json!({ "id": l.id, "creationDate": l.created });
    }
    if with_payload && k.extractable {
        if let Some(p) = &k.payload {
            v["payload"] = json!(b64::encode(p));
        }
    }
    v
}

fn collection(items: Vec<Value>) -> Value {
    json!({
        "metadata": { "collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": items.len() },
        "resources": items,
    })
}

fn list(sh: &Shared, method: &Method, query: Option<&str>) -> Response<Body> {
    let states: Vec<i64> = match query_param(query, "state") {
        Some(s) => {
            let mut v = Vec::new();
            for p in s.split(',') {
                match p.trim().parse::<i64>() {
                    Ok(n) if matches!(n, 0 | 1 | 2 | 3 | 5) => v.push(n),
                    _ => return bad_field("state", "a comma list of 0, 1, 2, 3, 5"),
                }
            }
            v
        }
        None => vec![0, 1, 2, 3],
    };
    let extractable = match query_param(query, "extractable").as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return bad_field("extractable", "true or false"),
    };
    let limit = match query_param(query, "limit").map(|l| l.parse::<usize>()) {
        None => 200,
        Some(Ok(l)) if (1..=5000).contains(&l) => l,
        Some(_) => return bad_field("limit", "an integer between 1 and 5000"),
    };
    let offset = match query_param(query, "offset").map(|o| o.parse::<usize>()) {
        None => 0,
        Some(Ok(o)) => o,
        Some(_) => return bad_field("offset", "a non-negative integer"),
    };
    let s = sh.lock();
    let mut keys: Vec<&KeyRec> = s
        .keys
        .values()
        .filter(|k| states.contains(&k.state) && extractable.is_none_or(|e| e == k.extractable))
        .collect();
    keys.sort_by_key(|k| k.seq);
    let total = keys.len();
    if *method == Method::HEAD {
        let mut r = Response::new(Body::empty());
        r.headers_mut().insert(
            "key-total",
            HeaderValue::from_str(&total.to_string()).expect("digits"),
        );
        return r;
    }
    let items = keys
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|k| key_json(k, &sh.config.instance_id, false))
        .collect();
    json_resp(StatusCode::OK, &collection(items))
}

#[derive(Deserialize)]
struct CreateBody {
    #[serde(default)]
    resources: Vec<CreateRes>,
}

#[derive(Deserialize)]
struct CreateRes {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    extractable: Option<bool>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
}

fn create(sh: &Shared, body: &[u8]) -> Response<Body> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return kp_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: No body was provided",
            "NO_BODY_ERR",
            "The request body is empty",
            None,
        );
    }
    let Ok(b) = serde_json::from_slice::<CreateBody>(body) else {
        return kp_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: The body is not valid JSON",
            "BAD_BODY_ERR",
            "Invalid body",
            None,
        );
    };
    if b.resources.len() != 1 {
        return bad_field("resources", "an array with exactly one key");
    }
    let r = &b.resources[0];
    let Some(name) = r
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty() && n.len() <= 90)
    else {
        return bad_field("name", "a string of 2 to 90 characters");
    };
    let extractable = r.extractable.unwrap_or(true);
    let payload =
        match &r.payload {
            None => None,
            Some(p) => match b64::decode_lenient(p) {
                Ok(v) if !extractable && v.len() != 32 => return bad_field(
                    "payload",
                    "a base64 encoded 256-bit key for a root key (the emulator supports 256-bit root keys)",
                ),
                Ok(v) if v.is_empty() => return bad_field("payload", "a base64 encoded key material"),
                Ok(v) => Some(v),
                Err(_) => return bad_field("payload", "a base64 encoded key material"),
            },
        };
    {
        let s = sh.lock();
        for a in &r.aliases {
            if s.keys.values().any(|k| k.aliases.contains(a) || k.id == *a) {
                return kp_error(
                    StatusCode::CONFLICT,
                    "Conflict: The alias already exists",
                    "KEY_ALIAS_NOT_UNIQUE_ERR",
                    "Alias is not unique",
                    None,
                );
            }
        }
    }
    let id = create_key_inner(
        sh,
        name,
        r.description.clone(),
        extractable,
        payload,
        r.aliases.clone(),
    );
    let s = sh.lock();
    let k = &s.keys[&id];
    json_resp(
        StatusCode::CREATED,
        &collection(vec![key_json(
            k,
            &sh.config.instance_id,
            !extractable || r.payload.is_none(),
        )]),
    )
}

pub(super) fn create_key_direct(
    sh: &Shared,
    name: &str,
    extractable: bool,
    payload: Option<Vec<u8>>,
    aliases: Vec<String>,
) -> String {
    create_key_inner(sh, name, None, extractable, payload, aliases)
}

fn random_material() -> Zeroizing<Vec<u8>> {
    let mut m = Zeroizing::new(vec![0u8; 32]);
    rand::thread_rng().fill_bytes(&mut m);
    m
}

fn create_key_inner(
    sh: &Shared,
    name: &str,
    description: Option<String>,
    extractable: bool,
    payload: Option<Vec<u8>>,
    aliases: Vec<String>,
) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_rfc3339();
    let imported = payload.is_some();
    let (material, payload) = match (extractable, payload) {
        (false, Some(p)) => (Zeroizing::new(p), None),
        (false, None) => (random_material(), None),
        (true, Some(p)) => (random_material(), Some(Zeroizing::new(p))),
        (true, None) => (random_material(), Some(random_material())),
    };
    let mut s = sh.lock();
    s.seq += 1;
    let seq = s.seq;
    s.keys.insert(
        id.clone(),
        KeyRec {
            // The first version id equals the key id (as the docs' examples suggest).
            versions: vec![Version {
                id: id.clone(),
                material,
                created: now.clone(),
            }],
            id: id.clone(),
            name: name.to_owned(),
            description,
            aliases,
            extractable,
            imported,
            state: 1,
            payload,
            created: now.clone(),
            updated: now,
            rotated: None,
            deleted: None,
            seq,
        },
    );
    id
}

pub(super) fn rotate_direct(sh: &Shared, id: &str) -> Option<String> {
    let mut s = sh.lock();
    let k = s.keys.get_mut(id)?;
    let vid = uuid::Uuid::new_v4().to_string();
    let now = now_rfc3339();
    k.versions.push(Version {
        id: vid.clone(),
        material: random_material(),
        created: now.clone(),
    });
    k.rotated = Some(now.clone());
    k.updated = now;
    Some(vid)
}

fn find_key<'a>(s: &'a mut super::State, key: &str) -> Option<&'a mut KeyRec> {
    if s.keys.contains_key(key) {
        return s.keys.get_mut(key);
    }
    s.keys.values_mut().find(|k| k.aliases.iter().any(|a| a == key))
}

#[derive(Deserialize, Default)]
struct ActionBody {
    #[serde(default)]
    plaintext: Option<String>,
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    aad: Option<Vec<String>>,
    #[serde(default)]
    payload: Option<String>,
}

#[derive(serde::Serialize, Deserialize)]
struct Envelope {
    ciphertext: String,
    iv: String,
    version: String,
    handle: String,
}

fn aad_bytes(aad: &[String]) -> Vec<u8> {
    serde_json::to_vec(aad).expect("json")
}

fn seal(v: &Version, plaintext: &[u8], aad: &[String]) -> String {
    let cipher = Aes256Gcm::new_from_slice(&v.material).expect("32-byte key");
    let mut iv = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut iv);
    let aadb = aad_bytes(aad);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: plaintext,
                aad: &aadb,
            },
        )
        .expect("AES-GCM encrypt");
    let env = Envelope {
        ciphertext: b64::encode(&ct),
        iv: b64::encode(&iv),
        version: ENVELOPE_VERSION.into(),
        handle: v.id.clone(),
    };
    b64::encode(&serde_json::to_vec(&env).expect("json"))
}

enum Open {
    Ok(Zeroizing<Vec<u8>>, usize),
    Malformed,
    WrongKey,
}

fn open(k: &KeyRec, ciphertext: &str, aad: &[String]) -> Open {
    let Ok(raw) = b64::decode_lenient(ciphertext) else {
        return Open::Malformed;
    };
    let Ok(env) = serde_json::from_slice::<Envelope>(&raw) else {
        return Open::Malformed;
    };
    let (Ok(ct), Ok(iv)) = (b64::decode_lenient(&env.ciphertext), b64::decode_lenient(&env.iv)) else {
        return Open::Malformed;
    };
    if iv.len() != 12 || env.version != ENVELOPE_VERSION {
        return Open::Malformed;
    }
    let Some(vi) = k.versions.iter().position(|v| v.id == env.handle) else {
        return Open::WrongKey;
    };
    let cipher = Aes256Gcm::new_from_slice(&k.versions[vi].material).expect("32-byte key");
    let aadb = aad_bytes(aad);
    match cipher.decrypt(Nonce::from_slice(&iv), Payload { msg: &ct, aad: &aadb }) {
        Ok(p) => Open::Ok(Zeroizing::new(p), vi),
        Err(_) => Open::WrongKey,
    }
}

fn unprocessable() -> Response<Body> {
    kp_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Unprocessable Entity: The provided ciphertext is invalid or corrupted, or was not wrapped by this key, or the additional authentication data does not match",
        "UNPROCESSABLE_CIPHERTEXT_ERR",
        "The provided ciphertext is invalid or corrupted",
        Some(("field", "ciphertext")),
    )
}

fn version_json(v: &Version) -> Value {
    json!({ "id": v.id, "creationDate": v.created })
}

fn versions(sh: &Shared, key: &str, all_states: bool) -> Response<Body> {
    let mut s = sh.lock();
    let Some(k) = find_key(&mut s, key) else {
        return not_found();
    };
    if k.state != 1 && !all_states {
        return state_error(if k.state == 5 { 5 } else { 2 });
    }
    let items: Vec<Value> = k.versions.iter().rev().map(version_json).collect();
    json_resp(
        StatusCode::OK,
        &json!({
            "metadata": { "collectionType": "application/vnd.ibm.kms.key_version+json", "collectionTotal": items.len() },
            "resources": items,
        }),
    )
}

fn key_op(sh: &Shared, op: Op, key: &str, body: &[u8], prefer_repr: bool) -> Response<Body> {
    let needs_body = matches!(op, Op::Unwrap | Op::Rewrap);
    let ab: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        if needs_body {
            return kp_error(
                StatusCode::BAD_REQUEST,
                "Bad Request: No body was provided",
                "NO_BODY_ERR",
                "The request body is empty",
                None,
            );
        }
        ActionBody::default()
    } else {
        match serde_json::from_slice::<Option<ActionBody>>(body) {
            Ok(b) => b.unwrap_or_default(),
            Err(_) => {
                return kp_error(
                    StatusCode::BAD_REQUEST,
                    "Bad Request: The body is not valid JSON",
                    "BAD_BODY_ERR",
                    "Invalid body",
                    None,
                )
            }
        }
    };
    let aad = ab.aad.clone().unwrap_or_default();
    if aad.len() > 126 || aad.iter().any(|a| a.chars().count() > 255) {
        return bad_field("aad", "an array of at most 126 strings of at most 255 characters");
    }
    let instance = sh.config.instance_id.clone();
    let limit = sh.config.max_plaintext_b64;
    let mut s = sh.lock();
    if op == Op::Unwrap {
        if let Some(ct) = ab.ciphertext.as_deref() {
            *s.unwraps_by_ciphertext.entry(ct.trim().to_owned()).or_default() += 1;
        }
    }
    let Some(k) = find_key(&mut s, key) else {
        return not_found();
    };
    let root_only = matches!(op, Op::Wrap | Op::Unwrap | Op::Rewrap | Op::Rotate);
    if root_only && k.extractable {
        return kp_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: This action can only be done with a root key",
            "KEY_ROOT_REQ_ERR",
            "Requested action can only be completed with a root key",
            None,
        );
    }
    match op {
        Op::GetKey | Op::GetKeyMetadata => json_resp(
            StatusCode::OK,
            &collection(vec![key_json(k, &instance, op == Op::GetKey)]),
        ),
        Op::Wrap => {
            if k.state != 1 {
                return state_error(k.state);
            }
            let (plaintext, generated) = match ab.plaintext.as_deref() {
                Some(p) => {
                    if limit.is_some_and(|l| p.trim().len() > l) {
                        return bad_field(
                            "plaintext",
                            &format!("at most {} base64 characters", limit.unwrap_or(0)),
                        );
                    }
                    match b64::decode_lenient(p) {
                        Ok(v) if !v.is_empty() => (Zeroizing::new(v), false),
                        _ => return bad_field("plaintext", "a base64 encoded key material"),
                    }
                }
                None => (random_material(), true),
            };
            let latest = k.versions.last().expect("a version");
            let ciphertext = seal(latest, &plaintext, &aad);
            let mut v = json!({ "ciphertext": ciphertext, "keyVersion": version_json(latest) });
            if generated {
                v["plaintext"] = json!(b64::encode(&plaintext));
            }
            json_resp(StatusCode::OK, &v)
        }
        Op::Unwrap | Op::Rewrap => {
            if !matches!(k.state, 1 | 3) {
                return state_error(k.state);
            }
            let Some(ct) = ab.ciphertext.as_deref().filter(|c| !c.trim().is_empty()) else {
                return bad_field(
                    "ciphertext",
                    "the original base64 encoded ciphertext from the wrap operation",
                );
            };
            match open(k, ct, &aad) {
                Open::Malformed => bad_field(
                    "ciphertext",
                    "the original base64 encoded ciphertext from the wrap operation",
                ),
                Open::WrongKey => unprocessable(),
                Open::Ok(plaintext, vi) => {
                    let latest_i = k.versions.len() - 1;
                    let latest = &k.versions[latest_i];
                    if op == Op::Unwrap {
                        let mut v = json!({
                            "plaintext": b64::encode(&plaintext),
                            "keyVersion": version_json(&k.versions[vi]),
                        });
                        if vi != latest_i {
                            v["ciphertext"] = json!(seal(latest, &plaintext, &aad));
                            v["rewrappedKeyVersion"] = version_json(latest);
                        }
                        json_resp(StatusCode::OK, &v)
                    } else {
                        json_resp(
                            StatusCode::OK,
                            &json!({
                                "ciphertext": seal(latest, &plaintext, &aad),
                                "keyVersion": version_json(&k.versions[vi]),
                                "rewrappedKeyVersion": version_json(latest),
                            }),
                        )
                    }
                }
            }
        }
        Op::Rotate => {
            if k.state != 1 {
                return state_error(k.state);
            }
            let material = match ab.payload.as_deref() {
                Some(p) => match b64::decode_lenient(p) {
                    Ok(v) if v.len() == 32 => Zeroizing::new(v),
                    _ => return bad_field("payload", "a base64 encoded 256-bit key"),
                },
                None if k.imported => {
                    return bad_field("payload", "new key material for an imported root key")
                }
                None => random_material(),
            };
            let now = now_rfc3339();
            k.versions.push(Version {
                id: uuid::Uuid::new_v4().to_string(),
                material,
                created: now.clone(),
            });
            k.rotated = Some(now.clone());
            k.updated = now;
            if prefer_repr {
                json_resp(StatusCode::OK, &collection(vec![key_json(k, &instance, false)]))
            } else {
                no_content()
            }
        }
        Op::Disable => {
            if k.state != 1 {
                return state_error(k.state);
            }
            k.state = 2;
            k.updated = now_rfc3339();
            no_content()
        }
        Op::Enable => {
            if k.state != 2 {
                return state_error(if k.state == 5 { 5 } else { 2 });
            }
            k.state = 1;
            k.updated = now_rfc3339();
            no_content()
        }
        Op::Delete => {
            if k.state == 5 {
                return state_error(5);
            }
            let now = now_rfc3339();
            k.state = 5;
            k.deleted = Some(now.clone());
            k.updated = now;
            if prefer_repr {
                json_resp(StatusCode::OK, &collection(vec![key_json(k, &instance, false)]))
            } else {
                no_content()
            }
        }
        Op::Restore => {
            if k.state != 5 {
                return state_error(2);
            }
            k.state = 1;
            k.deleted = None;
            k.updated = now_rfc3339();
            json_resp(
                StatusCode::CREATED,
                &collection(vec![key_json(k, &instance, false)]),
            )
        }
        _ => kp_error(
            StatusCode::BAD_REQUEST,
            "Bad Request: unsupported action",
            "BAD_ACTION_ERR",
            "Unsupported action",
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_paths() {
        let c = |m: Method, p: &str, q: Option<&str>| classify(&m, p, q);
        assert_eq!(c(Method::POST, "/identity/token", None).0, Op::Token);
        assert_eq!(c(Method::POST, "/oidc/token", None).0, Op::Token);
        assert_eq!(c(Method::GET, "/api/v2/keys", None).0, Op::ListKeys);
        assert_eq!(c(Method::POST, "/api/v2/keys", None).0, Op::CreateKey);
        assert_eq!(
            c(Method::POST, "/api/v2/keys/a%2Fb/actions/wrap", None),
            (Op::Wrap, Some("a/b".into()))
        );
        assert_eq!(
            c(Method::POST, "/api/v2/keys/k", Some("action=unwrap")),
            (Op::Unwrap, Some("k".into()))
        );
        assert_eq!(
            c(Method::GET, "/api/v2/keys/k/metadata", None).0,
            Op::GetKeyMetadata
        );
        assert_eq!(c(Method::DELETE, "/api/v2/keys/k", None).0, Op::Delete);
        assert_eq!(c(Method::GET, "/nope", None).0, Op::Other);
        assert_eq!(super::super::hex_lower(&[1, 255]), "01ff");
    }

    #[test]
    fn pct() {
        assert_eq!(pct_decode("a%20b%2"), "a b%2");
        assert_eq!(pct_decode("%41"), "A");
        assert_eq!(pct_decode("%+1%aé"), "%+1%aé");
    }
}
