//! The training sets of a probe run (main, control, cross-matrix cells) and
//! their row masks, checked before any fitting.

use super::{Labels, ProbeSpec, Role};
use crate::error::{Error, Result};
use crate::rows::{Filter, Table};

/// One training set and the test sets scored by its probes.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) role: Role,
    pub(super) train: Filter,
    pub(super) tests: Vec<Filter>,
}

/// A training set with its row masks: (plan, train rows, rows of each test).
pub(super) type PlanRows = (Plan, Vec<bool>, Vec<Vec<bool>>);

/// Every training set's row masks (train, tests), checked, and the rows any of them uses.
pub(super) fn training_sets(
    spec: &ProbeSpec,
    table: &Table,
    labels: &Labels,
) -> Result<(Vec<PlanRows>, Vec<bool>)> {
    let mut masks = Vec::new();
    let mut used = vec![false; table.len()];
    for plan in plan(spec, table)? {
        let train = labelled(plan.train.mask(table)?, labels);
        let tests: Vec<Vec<bool>> = plan
            .tests
            .iter()
            .map(|t| Ok(labelled(t.mask(table)?, labels)))
            .collect::<Result<_>>()?;
        check_rows(&plan, &train, &tests, labels)?;
        for m in std::iter::once(&train).chain(&tests) {
            used.iter_mut().zip(m).for_each(|(u, &m)| *u |= m);
        }
        masks.push((plan, train, tests));
    }
    Ok((masks, used))
}

/// Keeps only rows with a label.
fn labelled(mut mask: Vec<bool>, labels: &Labels) -> Vec<bool> {
    mask.iter_mut()
        .zip(&labels.y)
        .for_each(|(m, y)| *m &= y.is_some());
    mask
}

/// Refuses plans whose rows cannot train or test a probe.
fn check_rows(plan: &Plan, train: &[bool], tests: &[Vec<bool>], labels: &Labels) -> Result<()> {
    let classes = |mask: &[bool]| {
        let pos = (0..mask.len())
            .filter(|&r| mask[r] && labels.y[r] == Some(true))
            .count();
        (pos, mask.iter().filter(|&&m| m).count() - pos)
    };
    let (pos, neg) = classes(train);
    if pos == 0 || neg == 0 {
        return Err(Error::BadInput(format!(
            "training filter `{}` selects {} rows with `{}` = {} and {} other rows: \
             a probe needs both classes",
            plan.train, pos, labels.field, labels.positive, neg
        )));
    }
    for (t, mask) in plan.tests.iter().zip(tests) {
        if classes(mask) == (0, 0) {
            return Err(Error::BadInput(format!(
                "test filter `{t}` selects no labelled rows"
            )));
        }
    }
    Ok(())
}

/// The training sets: main, control and the cross matrix.
pub(super) fn plan(spec: &ProbeSpec, table: &Table) -> Result<Vec<Plan>> {
    let (mut train, mut test) = (spec.train_filter.clone(), spec.test_filter.clone());
    let control = spec.control.resolve(table);
    if let Some(control) = &control {
        // The control rows are the control's, unless the filters ask for them.
        for field in control.fields() {
            if !train.mentions(field) && !test.mentions(field) {
                let mask = control.mask(table)?;
                let values = table.values(field, &mask)?;
                for v in values {
                    train = train.excluding(field, &v);
                    test = test.excluding(field, &v);
                }
            }
        }
    }
    let mut plans = vec![Plan {
        role: Role::Main,
        train,
        tests: vec![test],
    }];
    if let Some(control) = control {
        plans.push(Plan {
            role: Role::Control,
            train: control.clone(),
            tests: vec![control],
        });
    }
    if let Some(field) = &spec.cross {
        // Cells stay within the --train-filter/--test-filter rows (the control cue may be a cell).
        let (train_mask, test_mask) = (
            spec.train_filter.mask(table)?,
            spec.test_filter.mask(table)?,
        );
        let either: Vec<bool> = train_mask
            .iter()
            .zip(&test_mask)
            .map(|(a, b)| *a || *b)
            .collect();
        let values = table.values(field, &either)?;
        if values.len() < 2 {
            return Err(Error::BadInput(format!(
                "--cross {field}: the field has {} value(s) among the filtered rows; the matrix \
                 needs at least two",
                values.len()
            )));
        }
        let cell = |v: &str| Filter::equals(field, &[v]);
        for a in &values {
            plans.push(Plan {
                role: Role::Cross,
                train: spec.train_filter.and(&cell(a)),
                tests: values
                    .iter()
                    .map(|b| spec.test_filter.and(&cell(b)))
                    .collect(),
            });
        }
    }
    Ok(plans)
}
