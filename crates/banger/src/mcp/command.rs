//! `command_for_user`: the banger command line with which a person sees or repeats what a tool
//! did, its words quoted for a POSIX shell.

/// A word quoted for a POSIX shell: as is when it is safe, else in single quotes.
pub fn quote(word: &str) -> String {
    let safe = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%^".contains(&b));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A command line built word by word.
#[derive(Debug, Clone)]
pub struct Line(Vec<String>);

impl Line {
    /// `banger` and these words.
    pub fn banger(words: &[&str]) -> Self {
        Self(std::iter::once("banger").chain(words.iter().copied()).map(quote).collect())
    }

    /// Adds words.
    pub fn args<S: AsRef<str>>(mut self, words: impl IntoIterator<Item = S>) -> Self {
        self.0.extend(words.into_iter().map(|w| quote(w.as_ref())));
        self
    }

    /// Adds `flag value` when there is a value.
    pub fn opt(mut self, flag: &str, value: Option<impl ToString>) -> Self {
        if let Some(v) = value {
            self.0.push(flag.to_owned());
            self.0.push(quote(&v.to_string()));
        }
        self
    }

    /// Adds `flag` when `on`.
    pub fn flag(mut self, flag: &str, on: bool) -> Self {
        if on {
            self.0.push(flag.to_owned());
        }
        self
    }

    /// Adds `-- COMMAND...`.
    pub fn command(self, argv: &[String]) -> Self {
        self.args(["--"]).args(argv)
    }

    pub fn text(&self) -> String {
        self.0.join(" ")
    }
}

/// `banger vm exec VM [-w DIR] [-e K=V]... [-n] -- ARGV`.
pub fn exec(vm: &str, argv: &[String], cwd: Option<&str>, env: &[(String, String)], stdin: bool) -> String {
    let mut line = Line::banger(&["vm", "exec", vm]).opt("--workdir", cwd);
    for (k, v) in env {
        line = line.opt("--env", Some(format!("{k}={v}")));
    }
    line.flag("--no-stdin", !stdin).command(argv).text()
}

/// `banger vm exec VM -- PROGRAM ARGS` for a one-word guest command on `path` (`cat`, `stat`, ...).
pub fn guest(vm: &str, program: &[&str], path: &str) -> String {
    let argv: Vec<String> = program.iter().map(|w| (*w).to_owned()).chain([path.to_owned()]).collect();
    Line::banger(&["vm", "exec", vm, "--no-stdin"]).command(&argv).text()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_needed() {
        assert_eq!(quote("web"), "web");
        assert_eq!(quote("/root/a-b_c.py"), "/root/a-b_c.py");
        assert_eq!(quote("KEY=value"), "KEY=value");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("two words"), "'two words'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$HOME"), "'$HOME'");
        assert_eq!(quote("a;rm -rf /"), "'a;rm -rf /'");
    }

    #[test]
    fn exec_lines_use_the_clis_flags() {
        let argv = vec!["python3".to_owned(), "/root/hello.py".to_owned(), "a b".to_owned()];
        assert_eq!(
            exec("web", &argv, None, &[], false),
            "banger vm exec web --no-stdin -- python3 /root/hello.py 'a b'"
        );
        let env = vec![("A".to_owned(), "1 2".to_owned())];
        assert_eq!(
            exec("web", &["true".to_owned()], Some("/srv"), &env, true),
            "banger vm exec web --workdir /srv --env 'A=1 2' -- true"
        );
        assert_eq!(guest("web", &["cat"], "/etc/os release"), "banger vm exec web --no-stdin -- cat '/etc/os release'");
    }

    #[test]
    fn lines_take_options_flags_and_commands() {
        let line = Line::banger(&["vm", "run", "--rm"])
            .opt("--image", Some("debian-bookworm"))
            .opt("--cpus", None::<u32>)
            .flag("--no-network", true)
            .command(&["echo".to_owned(), "hi there".to_owned()]);
        assert_eq!(line.text(), "banger vm run --rm --image debian-bookworm --no-network -- echo 'hi there'");
    }
}
