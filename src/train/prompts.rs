//! Training prompts with their task tags: the world's shipped training prompts, or prompt
//! files (one prompt per line) per task for real pipelines (e.g. the paper's GenEval, OCR and
//! PickScore training sets).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::io::prompts::read_prompt_file;

use crate::world::Task;
use crate::world::prompts::{Prompt, Split, shipped_prompts};

/// A prompt and the task it belongs to (which picks its reward and its routed teacher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPrompt {
    pub text: String,
    pub task: Task,
}

impl From<&Prompt> for TaskPrompt {
    fn from(p: &Prompt) -> Self {
        Self { text: p.text.clone(), task: p.task() }
    }
}

/// The training prompts of `tasks`: from `files` (task -> file) when given, else the world's
/// shipped training split. Every task must have prompts.
pub fn training_prompts(tasks: &[Task], files: &BTreeMap<Task, PathBuf>) -> Result<Vec<TaskPrompt>, String> {
    let mut prompts = Vec::new();
    if files.is_empty() {
        prompts.extend(shipped_prompts(Split::Train).iter().filter(|p| tasks.contains(&p.task())).map(TaskPrompt::from));
    } else {
        for &task in tasks {
            let path = files.get(&task).ok_or_else(|| format!("`prompt_files`: no file for task `{}`", task.name()))?;
            prompts.extend(read_prompt_file(path).map_err(|e| e.to_string())?.into_iter().map(|text| TaskPrompt { text, task }));
        }
    }
    for task in tasks {
        if !prompts.iter().any(|p| p.task == *task) {
            return Err(format!("no training prompts for task `{}`", task.name()));
        }
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_files_skip_blanks_and_comments_and_tag_their_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ocr.txt");
        std::fs::write(&path, "# OCR training prompts\n\na sign that says \"hello\"\n  a label reading \"42\"  \n").unwrap();
        let files = BTreeMap::from([(Task::Text, path)]);
        let prompts = training_prompts(&[Task::Text], &files).unwrap();
        assert_eq!(prompts.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(), ["a sign that says \"hello\"", "a label reading \"42\""]);
        assert!(prompts.iter().all(|p| p.task == Task::Text));
        let missing = training_prompts(&[Task::Composition], &files).unwrap_err();
        assert!(missing.contains("composition"), "{missing}");
        std::fs::write(dir.path().join("empty.txt"), "# nothing\n").unwrap();
        let empty = read_prompt_file(&dir.path().join("empty.txt")).unwrap_err().to_string();
        assert!(empty.contains("empty.txt") && empty.contains("no prompts"), "{empty}");
    }

    #[test]
    fn world_prompts_are_filtered_by_task() {
        let prompts = training_prompts(&[Task::Composition, Task::Text], &BTreeMap::new()).unwrap();
        assert!(prompts.iter().all(|p| matches!(p.task, Task::Composition | Task::Text)));
        assert!(prompts.iter().any(|p| p.task == Task::Text));
    }
}
