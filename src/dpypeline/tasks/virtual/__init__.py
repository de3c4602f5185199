"""Zero-copy stores: a file's chunk references, not its data, committed into an Icechunk
repository (:mod:`.task`); where the references point and how they are read
(:mod:`.sources`); what a file must share with the repository to be appended (:mod:`.checks`);
the repository's references as kerchunk for tools without Icechunk (:mod:`.export`)."""
