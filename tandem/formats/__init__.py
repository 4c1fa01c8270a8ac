"""What travels between commands, below every command that writes or reads it: the export manifest
(:mod:`.export_manifest`), compiled artifacts' manifest (:mod:`.compiled_manifest`), the build
folder and its manifest (:mod:`.build_manifest`), build targets (:mod:`.targets`) and the folder
resolver that finds any of them wherever a folder is asked for (:mod:`.folders`)."""
