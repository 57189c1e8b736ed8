//! Progress of long work: a bar on a terminal, a plain line every 15 s
//! otherwise (logs, Slurm), safe to advance from several threads.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    task: String,
    unit: String,
    total: usize,
    state: Mutex<State>,
}

struct State {
    done: usize,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// `task` names the work ("capture"), `unit` what is counted ("rows").
    pub fn new(task: &str, unit: &str, total: usize) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{task} {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}  ETA {{eta}}"
                ))
                .expect("valid template"),
            );
            bar
        });
        Progress {
            bar,
            task: task.into(),
            unit: unit.into(),
            total,
            state: Mutex::new(State {
                done: 0,
                started: Instant::now(),
                last_line: Instant::now(),
            }),
        }
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        let state = self.state.lock().expect("progress lock");
        state.started.elapsed().as_secs_f64()
    }

    /// Counts `n` more units done; `message` (e.g. a rate) is shown beside the count.
    pub fn advance(&self, n: usize, message: Option<String>) {
        let mut state = self.state.lock().expect("progress lock");
        state.done += n;
        let message = message.unwrap_or_default();
        match &self.bar {
            Some(bar) => {
                bar.set_position(state.done as u64);
                bar.set_message(message);
            }
            None if state.last_line.elapsed() > Duration::from_secs(15) => {
                let secs = state.started.elapsed().as_secs_f64();
                let eta = (self.total - state.done.min(self.total)) as f64 * secs
                    / state.done.max(1) as f64;
                let sep = if message.is_empty() { "" } else { ", " };
                eprintln!(
                    "afprobe: {} {}/{} {}{sep}{message}, ETA {eta:.0}s",
                    self.task, state.done, self.total, self.unit
                );
                state.last_line = Instant::now();
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
