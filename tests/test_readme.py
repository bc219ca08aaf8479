"""The README shows the shipped sample configuration, and that sample passes check-config."""
from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from rmilter import config as rconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReadmeTests(SynchronousTestCase):
    def test_readme_embeds_the_sample_verbatim(self) -> None:
        with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        with open(os.path.join(REPO, "rmilter.conf.sample"), encoding="utf-8") as f:
            sample = f.read()
        begin = readme.index("<!-- sample:begin -->\n```\n") + len("<!-- sample:begin -->\n```\n")
        end = readme.index("```\n<!-- sample:end -->")
        self.assertEqual(readme[begin:end], sample)

    def test_readme_names_the_default_socket_the_code_uses(self) -> None:
        from rmilter.config.schema import DEFAULT_BIND_SOCKET

        with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        self.assertIn(DEFAULT_BIND_SOCKET, readme)
        self.assertEqual(rconfig.default().main.bind_socket, DEFAULT_BIND_SOCKET)
