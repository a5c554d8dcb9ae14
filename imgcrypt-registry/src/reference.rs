//! Image references, in skopeo's transport syntax: `oci:PATH[:TAG]` and
//! `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`.

use std::fmt;
use std::path::PathBuf;

use crate::error::Error;

/// Docker Hub's API host (`docker://busybox` means `docker.io/library/busybox`).
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory, with an optional tag (`org.opencontainers.image.ref.name`).
    Layout {
        /// The directory.
        path: PathBuf,
        /// The tag.
        tag: Option<String>,
    },
    /// An image in a registry.
    Registry(RegistryRef),
    /// `oci-archive:PATH[:TAG]`: a tar of an OCI image layout.
    OciArchive {
        /// The archive file.
        path: PathBuf,
        /// The tag in its `index.json`.
        tag: Option<String>,
    },
    /// `docker-archive:PATH[:NAME:TAG]`: `docker save` output.
    DockerArchive {
        /// The archive file.
        path: PathBuf,
        /// `NAME:TAG` in its `manifest.json` (`RepoTags`).
        name: Option<String>,
    },
}

/// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// `host[:port]` as named (`docker.io` for Docker Hub).
    pub host: String,
    /// The repository (`library/busybox`).
    pub repo: String,
    /// Tag or digest.
    pub reference: Reference,
}

/// A tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `:tag` (defaults to `latest`).
    Tag(String),
    /// `@sha256:…`.
    Digest(String),
}

impl Reference {
    /// The string used in `/v2/<repo>/manifests/<reference>`.
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(t) | Reference::Digest(t) => t,
        }
    }
}

impl RegistryRef {
    /// Parses `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]` (`docker://busybox` is Docker Hub's
    /// `library/busybox:latest`).
    ///
    /// # Errors
    /// [`Error::BadReference`] naming what is wrong, also for another transport.
    pub fn parse(input: &str) -> Result<RegistryRef, Error> {
        match ImageRef::parse(input)? {
            ImageRef::Registry(r) => Ok(r),
            _ => Err(bad(
                input,
                "not a registry image: write docker://HOST[:PORT]/REPO[:TAG]",
            )),
        }
    }

    /// The host the API is served from (`registry-1.docker.io` for `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.host == "docker.io" {
            DOCKER_HUB_API
        } else {
            &self.host
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout { path, tag: Some(t) } => write!(f, "oci:{}:{t}", path.display()),
            ImageRef::Layout { path, tag: None } => write!(f, "oci:{}", path.display()),
            ImageRef::Registry(r) => write!(f, "{r}"),
            ImageRef::OciArchive { path, tag: Some(t) } => write!(f, "oci-archive:{}:{t}", path.display()),
            ImageRef::OciArchive { path, tag: None } => write!(f, "oci-archive:{}", path.display()),
            ImageRef::DockerArchive { path, name: Some(n) } => {
                write!(f, "docker-archive:{}:{n}", path.display())
            }
            ImageRef::DockerArchive { path, name: None } => write!(f, "docker-archive:{}", path.display()),
        }
    }
}

impl std::str::FromStr for RegistryRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        RegistryRef::parse(s)
    }
}

impl std::str::FromStr for ImageRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        ImageRef::parse(s)
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "docker://{}/{}:{t}", self.host, self.repo),
            Reference::Digest(d) => write!(f, "docker://{}/{}@{d}", self.host, self.repo),
        }
    }
}

fn bad(input: &str, why: &str) -> Error {
    Error::BadReference {
        input: input.to_owned(),
        why: why.to_owned(),
    }
}

fn valid_tag(t: &str) -> bool {
    let mut chars = t.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && t.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

fn valid_repo(r: &str) -> bool {
    !r.is_empty()
        && r.split('/').all(|comp| {
            !comp.is_empty()
                && comp
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
                && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
                && comp.ends_with(|c: char| c.is_ascii_alphanumeric())
        })
}

fn looks_like_host(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost"
}

impl ImageRef {
    /// Parses a reference.
    ///
    /// # Errors
    /// [`Error::BadReference`] naming what is wrong.
    pub fn parse(input: &str) -> Result<ImageRef, Error> {
        if let Some(rest) = input.strip_prefix("oci:") {
            // As containers/image: the path ends at the first ':'.
            let (path, tag) = match rest.split_once(':') {
                Some((p, t)) => (p, Some(t)),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad(input, "the layout path is empty"));
            }
            if let Some(t) = tag {
                if t.is_empty() {
                    return Err(bad(input, "the tag after ':' is empty"));
                }
                if t.chars().any(|c| c.is_control() || c == '/') {
                    return Err(bad(
                        input,
                        "the tag contains '/' or control characters (a ':' ends the layout path)",
                    ));
                }
            }
            return Ok(ImageRef::Layout {
                path: PathBuf::from(path),
                tag: tag.map(str::to_owned),
            });
        }
        for (prefix, docker) in [("oci-archive:", false), ("docker-archive:", true)] {
            let Some(rest) = input.strip_prefix(prefix) else {
                continue;
            };
            // As containers/image: the path ends at the first ':'.
            let (path, extra) = match rest.split_once(':') {
                Some((p, t)) => (p, Some(t)),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad(input, "the archive path is empty"));
            }
            if let Some(t) = extra {
                if t.is_empty() || t.chars().any(char::is_control) {
                    return Err(bad(
                        input,
                        "the name after the path is empty or has control characters",
                    ));
                }
                if docker && !t.contains(':') {
                    return Err(bad(input, "docker-archive:PATH:NAME:TAG needs both NAME and TAG"));
                }
            }
            let path = PathBuf::from(path);
            let extra = extra.map(str::to_owned);
            return Ok(if docker {
                ImageRef::DockerArchive { path, name: extra }
            } else {
                ImageRef::OciArchive { path, tag: extra }
            });
        }
        if let Some(rest) = input.strip_prefix("docker://") {
            return Self::parse_registry(input, rest).map(ImageRef::Registry);
        }
        let transport = input.split_once(':').map(|(t, _)| t).unwrap_or("");
        let why = match transport {
            "" => "no transport: prefix it with oci: or docker://".to_owned(),
            "docker" => "docker: needs two slashes: docker://HOST/REPO:TAG".to_owned(),
            t => format!(
                "transport {t:?} is not supported (supported: oci:, docker://, oci-archive:, docker-archive:)"
            ),
        };
        Err(bad(input, &why))
    }

    fn parse_registry(input: &str, rest: &str) -> Result<RegistryRef, Error> {
        if rest.is_empty() {
            return Err(bad(input, "no registry or repository"));
        }
        let (name, reference) = if let Some((n, d)) = rest.split_once('@') {
            if !valid_digest(d) {
                return Err(bad(
                    input,
                    &format!("{d:?} is not a sha256 digest (sha256: and 64 lowercase hex digits)"),
                ));
            }
            (n, Reference::Digest(d.to_owned()))
        } else {
            // A ':' after the last '/' starts the tag.
            let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
            match rest[last_slash..].rfind(':') {
                Some(i) => {
                    let t = &rest[last_slash + i + 1..];
                    if !valid_tag(t) {
                        return Err(bad(
                            input,
                            &format!("{t:?} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"),
                        ));
                    }
                    (&rest[..last_slash + i], Reference::Tag(t.to_owned()))
                }
                None => (rest, Reference::Tag("latest".to_owned())),
            }
        };
        let (host, repo) = match name.split_once('/') {
            Some((h, r)) if looks_like_host(h) => (h.to_owned(), r.to_owned()),
            _ => {
                let repo = if name.contains('/') {
                    name.to_owned()
                } else {
                    format!("library/{name}")
                };
                ("docker.io".to_owned(), repo)
            }
        };
        if let Some((_, port)) = host.rsplit_once(':') {
            if port.parse::<u16>().is_err() {
                return Err(bad(input, &format!("{port:?} is not a port number")));
            }
        }
        if !valid_repo(&repo) {
            return Err(bad(
                input,
                &format!("{repo:?} is not a valid repository name (lowercase letters, digits, '.', '_', '-', separated by '/')"),
            ));
        }
        Ok(RegistryRef {
            host,
            repo,
            reference,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> RegistryRef {
        match ImageRef::parse(s).unwrap() {
            ImageRef::Registry(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn layouts() {
        assert_eq!(
            ImageRef::parse("oci:/tmp/a:v1").unwrap(),
            ImageRef::Layout {
                path: "/tmp/a".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:rel/dir").unwrap(),
            ImageRef::Layout {
                path: "rel/dir".into(),
                tag: None
            }
        );
        assert_eq!(ImageRef::parse("oci:x:v1").unwrap().to_string(), "oci:x:v1");
        for b in ["oci:", "oci::v1", "oci:/a:", "dir:/a", "/tmp/a", "docker:/x"] {
            let e = ImageRef::parse(b).unwrap_err();
            assert!(matches!(e, Error::BadReference { .. }), "{b}");
        }
    }

    #[test]
    fn registries() {
        let r = reg("docker://127.0.0.1:5000/team/app:v1.2");
        assert_eq!((r.host.as_str(), r.repo.as_str()), ("127.0.0.1:5000", "team/app"));
        assert_eq!(r.reference, Reference::Tag("v1.2".into()));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = reg(&format!("docker://localhost/app@{d}"));
        assert_eq!(r.reference, Reference::Digest(d));
        let r = reg("docker://busybox");
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.api_host()),
            ("docker.io", "library/busybox", DOCKER_HUB_API)
        );
        assert_eq!(r.reference, Reference::Tag("latest".into()));
        assert_eq!(reg("docker://h.io/a/b").to_string(), "docker://h.io/a/b:latest");
        assert_eq!(
            "docker://h.io/a/b:v1".parse::<RegistryRef>().unwrap(),
            reg("docker://h.io/a/b:v1")
        );
        assert!(RegistryRef::parse("oci:/tmp/x").is_err());
        for b in [
            "docker://",
            "docker://h.io/App:v1",
            "docker://h.io/a:",
            "docker://h.io/a@sha256:12",
            "docker://h:99999/a",
            "docker://h.io//a",
        ] {
            assert!(
                matches!(ImageRef::parse(b).unwrap_err(), Error::BadReference { .. }),
                "{b}"
            );
        }
    }
}
