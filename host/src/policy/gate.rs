//! The gate at ingress: every transaction passes it between the source and the
//! guests, and leaves with each column's action applied, denied columns removed and
//! the relation rewritten to match.
//!
//! ```text
//! source ──Transaction (raw)──▶ Gate::apply ──Transaction (policy applied)──▶ guests ──▶ sinks
//!                                   │
//!                      per relation: Plan (resolved once per Relation message)
//! ```
//!
//! Invariants:
//! - A value leaves the gate only with its column's action applied: new and old
//!   images alike, key columns included, so the guests, the lake, the spine's `old`
//!   payload and every log see only the result.
//! - A removed column is removed from the relation too: no sink writes it, no guest
//!   can name it, its name appears only in the notice that it was denied.
//! - A column whose type its action cannot take stops the run with the table, the
//!   column, the class and the fix; nothing of the transaction leaves.
//! - A plan is made once per relation version (one `Arc<Relation>`); a transaction
//!   whose relations all keep every column passes without a copy.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Action, By, Denial, Policy, Resolved};
use crate::change::identity::Identity;
use crate::change::{Change, Column, Relation, Transaction, Value};

/// An identity column as a column, for resolutions and notices.
fn identity_column(name: &str) -> Column {
    Column {
        name: name.to_owned(),
        type_oid: crate::change::oid::TEXT,
        type_modifier: -1,
        key: false,
    }
}

/// Why a relation cannot pass the gate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{table}.{column} ({type_name}) is class `{class}` by {by}, and {problem}: give the column a class whose action takes its type in [policy.columns], or change the class's action"
)]
pub struct GateError {
    pub table: String,
    pub column: String,
    pub type_name: String,
    pub class: String,
    pub by: String,
    pub problem: String,
}

/// What the gate does to one relation version.
#[derive(Debug)]
pub struct Plan {
    /// The relation as PostgreSQL described it.
    pub source: Arc<Relation>,
    /// The relation that leaves the gate.
    pub relation: Arc<Relation>,
    /// Each source column's resolution, in source order.
    pub resolved: Vec<(Column, Resolved)>,
    /// The identity columns' resolutions ([`IDENTITY_COLUMNS`]).
    pub resolved_identity: Vec<(Column, Resolved)>,
    /// For each output column: its source index and its action.
    outputs: Vec<(usize, Action)>,
    /// No column is removed: the actions other than `keep` apply in place (none:
    /// every column is kept as it is, and the transaction passes untouched).
    in_place: Option<Vec<(usize, Action)>>,
    /// The actions on the identity columns ([`IDENTITY_COLUMNS`], in that order);
    /// `None` when every one keeps its value.
    identity: Option<[Action; 5]>,
    /// Whether the identity columns' denials were told (at the first change of this
    /// relation version that carried an identity).
    identity_told: std::sync::atomic::AtomicBool,
}

/// The lake's identity columns, which the policy classifies like any column of the
/// table (`"public.orders._client_addr" = "pii"`). No guest stage can be responsible
/// for them: guests cannot write an identity.
pub const IDENTITY_COLUMNS: [&str; 5] = [
    "_session_user",
    "_role",
    "_actor",
    "_application_name",
    "_client_addr",
];

impl Plan {
    /// The plan for `relation` under `policy` (and its columns' comment classes);
    /// with `identity`, the identity columns are classified too.
    pub fn new(
        policy: &Policy,
        relation: &Arc<Relation>,
        identity: bool,
    ) -> Result<Plan, GateError> {
        let mut resolved = Vec::with_capacity(relation.columns.len());
        let mut resolved_identity = Vec::with_capacity(IDENTITY_COLUMNS.len());
        let mut outputs = Vec::with_capacity(relation.columns.len());
        let mut columns = Vec::with_capacity(relation.columns.len());
        for (i, column) in relation.columns.iter().enumerate() {
            let r = policy.resolve(
                &relation.schema,
                &relation.name,
                &column.name,
                relation
                    .comment_classes
                    .get(&column.name)
                    .map(String::as_str),
            );
            if let Some(problem) = r.action.refuses(column.type_oid) {
                return Err(GateError {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                    type_name: crate::change::text::type_name(column.type_oid).to_owned(),
                    class: r.class.clone().unwrap_or_default(),
                    by: r.by.to_string(),
                    problem,
                });
            }
            if let Some((type_oid, type_modifier)) =
                r.action.output_type(column.type_oid, column.type_modifier)
            {
                columns.push(Column {
                    name: column.name.clone(),
                    type_oid,
                    type_modifier,
                    key: column.key,
                });
                outputs.push((i, r.action.clone()));
            }
            resolved.push((column.clone(), r));
        }
        let mut identity_actions = Vec::with_capacity(IDENTITY_COLUMNS.len());
        for name in IDENTITY_COLUMNS.into_iter().filter(|_| identity) {
            let r = policy.resolve(&relation.schema, &relation.name, name, None);
            let problem = match &r.action {
                Action::Guest(_) => Some(
                    "identity columns cannot be given to a guest stage (no guest can write them)"
                        .to_owned(),
                ),
                action => action.refuses(crate::change::oid::TEXT),
            };
            if let Some(problem) = problem {
                return Err(GateError {
                    table: relation.qualified_name(),
                    column: name.to_owned(),
                    type_name: "text".to_owned(),
                    class: r.class.clone().unwrap_or_default(),
                    by: r.by.to_string(),
                    problem,
                });
            }
            identity_actions.push(r.action.clone());
            resolved_identity.push((identity_column(name), r));
        }
        let identity_plan: Option<[Action; 5]> = identity_actions
            .iter()
            .any(|a| *a != Action::Keep)
            .then(|| identity_actions.try_into().expect("five identity columns"));
        let in_place: Option<Vec<(usize, Action)>> = (outputs.len() == relation.columns.len())
            .then(|| {
                outputs
                    .iter()
                    .filter(|(_, a)| !a.passes_raw())
                    .cloned()
                    .collect()
            });
        let identity = in_place.as_ref().is_some_and(Vec::is_empty);
        let out = if identity {
            relation.clone()
        } else {
            // Nothing of a removed column stays, its name included.
            let comment_classes = relation
                .comment_classes
                .iter()
                .filter(|(name, _)| columns.iter().any(|c| &c.name == *name))
                .map(|(n, c)| (n.clone(), c.clone()))
                .collect();
            Arc::new(Relation {
                columns,
                comment_classes,
                ..(**relation).clone()
            })
        };
        Ok(Plan {
            in_place,
            source: relation.clone(),
            relation: out,
            resolved,
            resolved_identity,
            outputs,
            identity: identity_plan,
            identity_told: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `identity` with this plan's actions applied to its fields.
    fn apply_identity(
        actions: &[Action; 5],
        identity: &Identity,
        policy: &Policy,
        scratch: &mut Vec<u8>,
    ) -> Identity {
        let mut apply = |action: &Action, field: Option<String>| -> Option<String> {
            let mut value = field.map_or(Value::Null, Value::Text);
            action.apply(&mut value, policy.key.as_ref(), scratch);
            match value {
                Value::Text(text) => Some(text),
                _ => None,
            }
        };
        let [session_user, role, actor, application_name, client_addr] = actions;
        let (actor_text, claim) = match &identity.actor {
            Some((text, claim)) => (Some(text.clone()), Some(*claim)),
            None => (None, None),
        };
        Identity {
            role: apply(role, identity.role.clone()),
            session_user: apply(session_user, Some(identity.session_user.clone()))
                .unwrap_or_default(),
            actor: apply(actor, actor_text).zip(claim),
            application_name: apply(application_name, identity.application_name.clone()),
            client_addr: apply(client_addr, identity.client_addr.clone()),
            pid: identity.pid,
        }
    }

    fn apply(&self, change: &mut Change, policy: &Policy, scratch: &mut Vec<u8>) {
        if let Some(actions) = &self.in_place {
            if actions.is_empty() {
                return; // every column kept as it is
            }
            change.relation = self.relation.clone();
            for image in [&mut change.new, &mut change.old].into_iter().flatten() {
                for (i, action) in actions {
                    action.apply(&mut image[*i], policy.key.as_ref(), scratch);
                }
            }
            return;
        }
        change.relation = self.relation.clone();
        for image in [&mut change.new, &mut change.old].into_iter().flatten() {
            let mut out = Vec::with_capacity(self.outputs.len());
            for (i, action) in &self.outputs {
                let mut value = std::mem::replace(&mut image[*i], Value::Null);
                action.apply(&mut value, policy.key.as_ref(), scratch);
                out.push(value);
            }
            // The values of removed columns are dropped here, unseen.
            *image = out;
        }
    }
}

/// The gate: the policy and a plan per relation seen.
pub struct Gate {
    policy: Arc<Policy>,
    /// Whether changes carry identities, whose columns the policy classifies.
    identity: bool,
    plans: HashMap<u32, Arc<Plan>>,
    /// Denied columns already noticed, as `(schema.table, column)`.
    noticed: HashSet<(String, String)>,
    scratch: Vec<u8>,
}

impl Gate {
    pub fn new(policy: Arc<Policy>, identity: bool) -> Gate {
        Gate {
            policy,
            identity,
            plans: HashMap::new(),
            noticed: HashSet::new(),
            scratch: Vec::new(),
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Applies the policy to every change of `txn`; returns what to tell.
    pub fn apply(&mut self, txn: &mut Transaction) -> Result<Vec<Denial>, GateError> {
        let mut notices = Vec::new();
        // Changes share their transaction's identity: each one is rewritten once per
        // plan, not once per change.
        let mut rewritten: Option<(Arc<Identity>, *const Plan, Arc<Identity>)> = None;
        for change in &mut txn.changes {
            let plan = self.plan(&change.relation, &mut notices)?;
            plan.apply(change, &self.policy, &mut self.scratch);
            // Identity columns are denied (and told) once changes carry identities.
            if change.identity.is_some()
                && !plan
                    .identity_told
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                for (column, r) in &plan.resolved_identity {
                    self.notice(&plan.source, column, r, &mut notices);
                }
            }
            if let (Some(actions), Some(identity)) = (&plan.identity, &change.identity) {
                let out = match &rewritten {
                    Some((from, p, out))
                        if Arc::ptr_eq(from, identity) && *p == Arc::as_ptr(&plan) =>
                    {
                        out.clone()
                    }
                    _ => {
                        let out = Arc::new(Plan::apply_identity(
                            actions,
                            identity,
                            &self.policy,
                            &mut self.scratch,
                        ));
                        rewritten = Some((identity.clone(), Arc::as_ptr(&plan), out.clone()));
                        out
                    }
                };
                change.identity = Some(out);
            }
        }
        Ok(notices)
    }

    /// Tells of `column` when the default denied it, once per table and column.
    fn notice(
        &mut self,
        relation: &Relation,
        column: &Column,
        r: &Resolved,
        notices: &mut Vec<Denial>,
    ) {
        if r.by == By::Default
            && r.action == Action::Drop
            && self
                .noticed
                .insert((relation.qualified_name(), column.name.clone()))
        {
            notices.push(Denial::Column {
                table: relation.qualified_name(),
                column: column.name.clone(),
                key: column.key,
            });
        }
    }

    fn plan(
        &mut self,
        relation: &Arc<Relation>,
        notices: &mut Vec<Denial>,
    ) -> Result<Arc<Plan>, GateError> {
        // One relation version is one `Arc`: a new one (a Relation message, the
        // snapshot's description) is planned once, and its rows find it by pointer.
        if let Some(plan) = self.plans.get(&relation.oid)
            && Arc::ptr_eq(&plan.source, relation)
        {
            return Ok(plan.clone());
        }
        let plan = Arc::new(Plan::new(&self.policy, relation, self.identity)?);
        for (column, r) in &plan.resolved {
            self.notice(relation, column, r, &mut *notices);
        }
        self.plans.insert(relation.oid, plan.clone());
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::change::{Lsn, Op, Part, ReplicaIdentity, TxnMeta, oid};
    use crate::policy::{Keyed, Normalize, Rule, Unclassified};

    fn relation(columns: &[(&str, u32, bool)]) -> Arc<Relation> {
        Arc::new(Relation {
            comment_classes: Default::default(),
            oid: 16_400,
            schema: "public".into(),
            name: "customers".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|(name, type_oid, key)| Column {
                    name: (*name).into(),
                    type_oid: *type_oid,
                    type_modifier: -1,
                    key: *key,
                })
                .collect(),
        })
    }

    fn policy(default: Unclassified, rules: &[(&str, &str)]) -> Arc<Policy> {
        let classes = BTreeMap::from([
            ("public".to_owned(), Action::Keep),
            ("pii".to_owned(), Action::Hmac(Normalize::default())),
            ("contact".to_owned(), Action::KeepLast(4)),
        ]);
        let rules = rules
            .iter()
            .map(|(p, c)| Rule {
                pattern: (*p).into(),
                class: (*c).into(),
            })
            .collect();
        Arc::new(Policy::new(
            default,
            classes,
            rules,
            Some(Keyed::new("k1", b"0123456789abcdef0123456789abcdef")),
        ))
    }

    fn txn(changes: Vec<Change>) -> Transaction {
        Transaction {
            meta: TxnMeta {
                xid: 1,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(11),
                commit_ts: 0,
                part: Part::WHOLE,
                copied: None,
            },
            changes,
        }
    }

    fn change(
        relation: &Arc<Relation>,
        op: Op,
        new: Option<Vec<Value>>,
        old: Option<Vec<Value>>,
    ) -> Change {
        Change {
            identity: None,
            relation: relation.clone(),
            op,
            lsn: Lsn(5),
            new,
            old,
        }
    }

    #[test]
    fn denied_columns_leave_no_trace_and_actions_cover_both_images_and_keys() {
        let rel = relation(&[
            ("id", oid::INT8, false),
            ("email", oid::TEXT, true),
            ("phone", oid::TEXT, false),
            ("ssn", oid::TEXT, false),
        ]);
        let p = policy(
            Unclassified::Deny,
            &[
                ("public.customers.id", "public"),
                ("public.customers.email", "pii"),
                ("public.customers.phone", "contact"),
            ],
        );
        let mut gate = Gate::new(p.clone(), false);
        let row = || {
            vec![
                Value::Int(7),
                Value::Text("ada@example.com".into()),
                Value::Text("+44 7946 0958".into()),
                Value::Text("078-05-1120".into()),
            ]
        };
        let mut t = txn(vec![
            change(&rel, Op::Insert, Some(row()), None),
            change(&rel, Op::Update, Some(row()), Some(row())),
        ]);
        let notices = gate.apply(&mut t).unwrap();
        assert_eq!(
            notices,
            vec![Denial::Column {
                table: "public.customers".into(),
                column: "ssn".into(),
                key: false
            }]
        );
        let token = Value::Text(p.key.as_ref().unwrap().token(b"ada@example.com"));
        for c in &t.changes {
            let names: Vec<&str> = c.relation.columns.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, ["id", "email", "phone"]);
            assert_eq!(c.relation.columns[1].type_oid, oid::TEXT);
            assert!(c.relation.columns[1].key, "the key flag stays");
            for image in [&c.new, &c.old].into_iter().flatten() {
                assert_eq!(
                    image,
                    &vec![
                        Value::Int(7),
                        token.clone(),
                        Value::Text("*********0958".into())
                    ]
                );
            }
            let text = format!("{c:?}");
            assert!(
                !text.contains("078-05-1120") && !text.contains("ada@"),
                "{text}"
            );
        }
        // Noticed once per run.
        let mut again = txn(vec![change(&rel, Op::Insert, Some(row()), None)]);
        assert!(gate.apply(&mut again).unwrap().is_empty());
    }

    #[test]
    fn a_relation_that_keeps_everything_passes_untouched() {
        let rel = relation(&[("id", oid::INT8, true), ("name", oid::TEXT, false)]);
        let mut gate = Gate::new(policy(Unclassified::Allow, &[]), false);
        let mut t = txn(vec![change(
            &rel,
            Op::Insert,
            Some(vec![Value::Int(1), Value::Text("x".into())]),
            None,
        )]);
        let before = t.clone();
        assert!(gate.apply(&mut t).unwrap().is_empty());
        assert_eq!(t, before);
        assert!(Arc::ptr_eq(&t.changes[0].relation, &rel));
    }

    #[test]
    fn identity_columns_are_classified_like_any_column_and_denied_by_default() {
        let rel = relation(&[("id", oid::INT8, true)]);
        let policy = policy(
            Unclassified::Deny,
            &[
                ("public.customers.id", "public"),
                ("public.customers._session_user", "public"),
                ("public.customers._role", "public"),
                ("public.customers._actor", "pii"),
                ("public.customers._client_addr", "contact"),
            ],
        );
        let who = Arc::new(Identity {
            session_user: "web".into(),
            role: Some("authenticated".into()),
            client_addr: Some("10.0.0.7".into()),
            pid: Some(7),
            application_name: Some("postgrest".into()),
            actor: Some((
                "user-17".into(),
                crate::change::identity::ActorClaim::JwtSub,
            )),
        });
        let mut changes = vec![
            change(&rel, Op::Insert, Some(vec![Value::Int(1)]), None),
            change(&rel, Op::Insert, Some(vec![Value::Int(2)]), None),
        ];
        for c in &mut changes {
            c.identity = Some(who.clone());
        }
        let mut gate = Gate::new(policy.clone(), true);
        let mut t = txn(changes);
        let notices = gate.apply(&mut t).unwrap();
        let out = t.changes[0].identity.clone().unwrap();
        assert_eq!(out.session_user, "web");
        assert_eq!(out.role.as_deref(), Some("authenticated"));
        let (actor, claim) = out.actor.clone().unwrap();
        assert!(
            actor.starts_with("k1:") && !actor.contains("user-17"),
            "{actor}"
        );
        assert_eq!(claim, crate::change::identity::ActorClaim::JwtSub);
        assert_eq!(out.client_addr.as_deref(), Some("****.0.7"));
        // Unclassified under deny: withheld, and told once.
        assert_eq!(out.application_name, None);
        assert_eq!(
            notices,
            vec![Denial::Column {
                table: "public.customers".into(),
                column: "_application_name".into(),
                key: false,
            }]
        );
        // One rewrite for the transaction's changes that share it.
        assert!(Arc::ptr_eq(&out, t.changes[1].identity.as_ref().unwrap()));

        // Without identity, the same policy says nothing of identity columns: off,
        // or on while no change carries one.
        for on in [false, true] {
            let mut gate = Gate::new(policy.clone(), on);
            let mut t = txn(vec![change(
                &rel,
                Op::Insert,
                Some(vec![Value::Int(1)]),
                None,
            )]);
            assert!(gate.apply(&mut t).unwrap().is_empty());
        }

        // No guest can be responsible for them.
        let mut classes = BTreeMap::from([("public".to_owned(), Action::Keep)]);
        classes.insert("stage".to_owned(), Action::Guest("10-mask".into()));
        let guest = Arc::new(Policy::new(
            Unclassified::Allow,
            classes,
            vec![Rule {
                pattern: "public.customers._actor".into(),
                class: "stage".into(),
            }],
            None,
        ));
        let error = Plan::new(&guest, &rel, true).unwrap_err().to_string();
        assert!(
            error.contains("_actor") && error.contains("guest stage"),
            "{error}"
        );
    }

    #[test]
    fn a_type_the_action_cannot_take_stops_with_table_column_and_class() {
        let rel = relation(&[("phone", oid::INT8, false)]);
        let mut gate = Gate::new(
            policy(Unclassified::Deny, &[("public.customers.phone", "contact")]),
            false,
        );
        let mut t = txn(vec![change(
            &rel,
            Op::Insert,
            Some(vec![Value::Int(1)]),
            None,
        )]);
        let error = gate.apply(&mut t).unwrap_err().to_string();
        assert!(
            error.starts_with("public.customers.phone (int8) is class `contact` by [policy.columns] \"public.customers.phone\", and `keep-last:4` takes only text columns"),
            "{error}"
        );
    }

    #[test]
    fn a_new_relation_version_is_planned_again_and_its_new_column_denied() {
        let v1 = relation(&[("id", oid::INT8, true)]);
        let v2 = relation(&[("id", oid::INT8, true), ("ssn", oid::TEXT, false)]);
        let mut gate = Gate::new(
            policy(Unclassified::Deny, &[("public.*.id", "public")]),
            false,
        );
        let mut t = txn(vec![
            change(&v1, Op::Insert, Some(vec![Value::Int(1)]), None),
            change(
                &v2,
                Op::Insert,
                Some(vec![Value::Int(2), Value::Text("078-05-1120".into())]),
                None,
            ),
        ]);
        let notices = gate.apply(&mut t).unwrap();
        assert_eq!(notices.len(), 1);
        assert_eq!(t.changes[1].new, Some(vec![Value::Int(2)]));
        assert_eq!(t.changes[1].relation.columns.len(), 1);
    }

    #[test]
    fn comments_tighten_the_plan_of_their_relation() {
        let mut rel = relation(&[("id", oid::INT8, true), ("note", oid::TEXT, false)]);
        Arc::make_mut(&mut rel)
            .comment_classes
            .insert("note".to_owned(), "pii".to_owned());
        let mut gate = Gate::new(
            policy(Unclassified::Deny, &[("public.customers.*", "public")]),
            false,
        );
        let mut t = txn(vec![change(
            &rel,
            Op::Insert,
            Some(vec![Value::Int(1), Value::Text("secret".into())]),
            None,
        )]);
        gate.apply(&mut t).unwrap();
        let Some(Value::Text(token)) = &t.changes[0].new.as_ref().unwrap().get(1) else {
            panic!()
        };
        assert!(token.starts_with("k1:"), "{token}");
    }
}
