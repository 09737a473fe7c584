"""Tricky configuration files, and what systemd's EnvironmentFile= makes of each.

One table for two tests: tests/unit/test_config.py feeds it to our parser and
tests/e2e/test_envfile_systemd.py to a real systemd (a unit with EnvironmentFile=), and
both must find what is written here. Where systemd takes something we cannot use or
silently drops a line, our parser reports a problem instead (`problem`), and `systemd`
records what systemd does, so the reason we give stays true.
"""

from dataclasses import dataclass
from typing import Mapping, Optional

REFUSED = None     # systemd refuses the whole file: the unit does not start


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    # What systemd puts in the unit's environment from this file (REFUSED: nothing, the
    # unit fails). Without `problem`, our parser must give exactly this too.
    systemd: Optional[Mapping[str, str]]
    # A phrase of the problem our parser reports, and the line it names.
    problem: Optional[str] = None
    line: Optional[int] = None
    # systemd v254 and later, where they differ from v252 (Debian 12).
    systemd_since_254: Optional[Mapping[str, str]] = None

    def systemd_for(self, version):
        if version >= 254 and self.systemd_since_254 is not None:
            return self.systemd_since_254
        return self.systemd


CASES = (
    # ---- what systemd and our parser read alike
    Case("plain", b"A=1\nB=two words\n", {"A": "1", "B": "two words"}),
    Case("empty file", b"", {}),
    Case("comments only", b"# one\n; two\n   # indented\n\n", {}),
    Case("blanks around key and value", b"  A =  x y  \t\n\tB\t=\tx\ty\t\n",
         {"A": "x y", "B": "x\ty"}),
    Case("no newline at the end", b"A=1\nB=x  ", {"A": "1", "B": "x"}),
    Case("empty values", b"A=\nB=''\nC=\"\"\nD=   \n", {"A": "", "B": "", "C": "", "D": ""}),
    Case("last assignment wins", b"A=1\nA=2\n", {"A": "2"}),
    Case("equals sign in the value", b"A=b=c\n", {"A": "b=c"}),
    Case("odd but valid names", b"_a1=1\nabc=2\nA_B_=3\n", {"_a1": "1", "abc": "2", "A_B_": "3"}),
    Case("comment signs after the start of a line", b"A=1 # not a comment\nB=2;3\nC=#4\n",
         {"A": "1 # not a comment", "B": "2;3", "C": "#4"}),
    Case("comment signs inside quotes", b"A=\"#x\"\nB=';y'\n", {"A": "#x", "B": ";y"}),
    Case("no comment after a quoted value", b"A='v' # x\nB=\"w\";y\n", {"A": "v# x", "B": "w;y"}),
    Case("single quotes keep everything", b"A='a \\ b \"c\" $d'\n", {"A": "a \\ b \"c\" $d"}),
    Case("double quotes unescape only \" \\ ` $",
         b"A=\"q\\\"d \\\\ \\$ \\` \\-x \\n\"\n", {"A": "q\"d \\ $ ` \\-x \\n"}),
    Case("a backslash outside quotes takes the next character",
         b"K=\"a\\-b\"\nU=a\\ b\nV=x\\-y\nW=\\\\\nX=\\\"q\\\"\n",
         {"K": "a\\-b", "U": "a b", "V": "x-y", "W": "\\", "X": "\"q\""}),
    Case("escaped blanks at the end stay", b"A=x\\ \nB=y \\\n\n", {"A": "x ", "B": "y "}),
    Case("a backslash at the start of the value", b"A=\\ x\n", {"A": " x"}),
    Case("continuation outside quotes", b"A=one \\\ntwo\nB=x\\\n  y\n",
         {"A": "one two", "B": "x  y"}),
    Case("continuation inside double quotes", b"A=\"one \\\ntwo\"\n", {"A": "one two"}),
    Case("no continuation inside single quotes", b"A='one \\\ntwo'\n", {"A": "one \\\ntwo"}),
    Case("a newline inside quotes is kept", b"A=\"x\ny\"\nB='1\n2'\n", {"A": "x\ny", "B": "1\n2"}),
    Case("quotes join what follows", b"A=x'y'\nB='x'y\nC='a' 'b'\nD=\"a\"'b'\nE=\"x\"y z\n",
         {"A": "x'y'", "B": "xy", "C": "ab", "D": "ab", "E": "xy z"}),
    Case("no variable expansion", b"A=$HOME\nB=\"${X}\"\n", {"A": "$HOME", "B": "${X}"}),
    Case("CRLF line ends", b"A=1\r\nB='x'\r\nC=y \r\n", {"A": "1", "B": "x", "C": "y"}),
    Case("a continuation before CRLF joins nothing", b"A=x\\\r\nB=2\r\n", {"A": "x", "B": "2"}),
    Case("CR alone ends a line", b"A=1\rB=2\r", {"A": "1", "B": "2"}),
    Case("UTF-8 values", "A=été\nB='日本'\n".encode(), {"A": "été", "B": "日本"}),
    Case("bytes that are not UTF-8 in a comment", b"# \xff\xfe\nA=1\n", {"A": "1"}),
    Case("a comment ending in a backslash, then a blank line", b"# c \\\n\nA=1\n", {"A": "1"}),
    Case("a comment ending in a backslash, then a comment", b"# c \\\n# d\nA=1\n", {"A": "1"}),
    Case("a comment ending in a backslash before CRLF", b"# c \\\r\nA=1\r\n", {"A": "1"}),
    Case("a backslash inside a comment", b"# a \\ b\nA=1\n", {"A": "1"}),

    # ---- what systemd takes or drops and our parser refuses, naming the line
    Case("a comment ending in a backslash, then an assignment", b"# c \\\nA=1\nB=2\n",
         {"B": "2"}, "ends with a backslash", 2, systemd_since_254={"A": "1", "B": "2"}),
    Case("export", b"export A=1\nB=2\n", {"B": "2"}, "does not know 'export'", 1),
    Case("a line without =", b"A=1\njust words\n", {"A": "1"}, "not a KEY=value line", 2),
    Case("a line starting with =", b"=x\nA=1\n", {"A": "1"}, "not a KEY=value line", 1),
    Case("a dash in the name", b"A-B=1\n", {}, "not a valid variable name", 1),
    Case("a name starting with a digit", b"1A=x\n", {}, "not a valid variable name", 1),
    Case("a blank inside the name", b"A B=1\n", {}, "not a valid variable name", 1),
    Case("a byte order mark", b"\xef\xbb\xbfA=1\nB=2\n", {"B": "2"}, "byte order mark", 1),
    Case("a quote never closed", b"A=1\nB=\"x\nC=1\n", {"A": "1", "B": "x\nC=1\n"},
         "never closed", 2),
    Case("a single quote never closed", b"A='x\n", {"A": "x\n"}, "never closed", 1),
    Case("a NUL byte", b"A=1\nB=2\x00C=3\n", REFUSED, "NUL byte", 2),
    Case("a value that is not UTF-8", b"A=1\nB=\xff\n", REFUSED, "not valid UTF-8", 2),
    Case("a code point systemd refuses", b"A=\xef\xbf\xbe\n", REFUSED, "not valid UTF-8", 1),
    Case("a name that is not UTF-8", b"\xffA=1\n", REFUSED, "not valid UTF-8", 1),
)
