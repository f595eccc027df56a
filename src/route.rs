//! The request path kept for logs.

use http::uri::{PathAndQuery, Uri};

/// A request's path (and query), kept by the layers for their log lines: a cheap clone of the
/// request's bytes, less than half the size of a whole [`Uri`] (streams and in-flight requests
/// each keep one).
#[derive(Clone, Debug, Default)]
pub(crate) struct RoutePath(Option<PathAndQuery>);

impl RoutePath {
    pub(crate) fn new(uri: &Uri) -> Self {
        Self(uri.path_and_query().cloned())
    }

    /// The path, as [`Uri::path`] gives it.
    pub(crate) fn path(&self) -> &str {
        self.0.as_ref().map_or("", PathAndQuery::path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_path_as_the_uri() {
        for u in [
            "/events?x=1",
            "/",
            "http://example.com",
            "http://example.com/a/b",
        ] {
            let uri: Uri = u.parse().unwrap();
            assert_eq!(RoutePath::new(&uri).path(), uri.path(), "{u}");
        }
    }
}
