//! Typed ids: a job's id and a worker's id are different things, not two `String`s. Both are
//! stored and sent as plain strings (`serde(transparent)`), so the stored state and the wire
//! are what they were.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

string_id! {
    /// A job's id (`j<seq>-<name>`), unique for the coordinator's life and never reused.
    JobId
}

string_id! {
    /// A registered worker's id (`w-<boot>-<n>`): new at every registration, so a worker that
    /// registers again after a coordinator restart has a new one.
    WorkerId
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn ids_are_plain_strings_when_stored_and_look_up_by_str() {
        let id = JobId::from("j1-demo");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"j1-demo\"");
        assert_eq!(serde_json::from_str::<JobId>("\"j1-demo\"").unwrap(), id);
        let workers: HashMap<WorkerId, u32> = [(WorkerId::from("w-a-1"), 7)].into();
        assert_eq!(workers.get("w-a-1"), Some(&7));
        assert!(id == "j1-demo" && format!("{id}") == "j1-demo");
    }
}
