"""Interoperability with other ReFT libraries; reft_ext itself does not depend on them."""
