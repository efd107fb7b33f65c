"""What the reliability campaign found, by category: the hand-kept half of docs/reliability.md
(the case counts come from running the campaign). Each finding names the test that now guards
it (a pytest node id under tests/). Add one when a campaign finds a failure; never remove one."""
from __future__ import annotations

# category -> (title, what is tried)
CATEGORIES = {
    "files": ("Fuzzed adapter files", "truncated, bit-flipped and lying safetensors headers, huge declared shapes, "
              "duplicate keys, extra files, wrong-typed / unknown / invalid config fields, paths that escape the "
              "folder, symlinks, failed saves"),
    "calls": ("Fuzzed calls", "random configs x tiny architectures x padding sides x prompt lengths x adapter "
              "assignments x dtypes (each row of a mixed batch equals its adapter alone); wrong types and values "
              "for every public argument"),
    "numerics": ("Numerics", "NaN / Inf in one row's prompt; adapters whose weights went NaN or Inf"),
    "long_runs": ("Long runs and resources", "generate calls with changing adapters and batch sizes, "
                  "add / delete / load cycles: RSS, per-call state, hooks, cached banks"),
    "concurrency": ("Concurrency", "threads serving one model at once, against the same requests run in turn"),
}

# Each: {"category": ..., "found": what failed, "fix": what changed, "test": node id, "left": "" or why not fixed}
FINDINGS: list[dict] = [
    # --- files (test_files.py)
    {"category": "files",
     "found": 'a safetensors header declaring a huge tensor (2^28 floats, valid offsets into a sparse file), '
              'expected or not, was read in full (get_tensor of every key) before its name and shape were checked: '
              '~1 GiB allocated per case, seconds per load; duplicate keys in the header were accepted (last one '
              'wins).',
     "fix": 'io.read_header reads the JSON header alone (bounded, duplicate keys refused); io.read_weights '
            'checks tensor names, shapes and float dtypes against the model before any tensor is read.',
     "test": "tests/reliability/test_files.py::test_lying_safetensors_headers",
     "left": ""},
    {"category": "files",
     "found": 'a weights file that is a named pipe (or a symlink to one) blocked load_adapter forever.',
     "fix": 'files are opened O_NONBLOCK and fstat-ed: a directory, device or pipe where a file should be raises '
            'AdapterFileError without being read.',
     "test": "tests/reliability/test_files.py::test_special_files",
     "left": ""},
    {"category": "files",
     "found": "subfolder '../x', 'a/../../x' or an absolute path loaded an adapter from outside the folder "
              "(load_adapter, PARAConfig.from_pretrained, and the Hub snapshot's folder); adapter_name '../x' "
              'read the files outside the folder before the name was refused (also found by the calls campaign, '
              'whose _check_new_name now runs before resolving).',
     "fix": "io refuses a subfolder / adapter_name that is absolute or contains '..' (adapter_name: any "
            'separator) before any path is joined: ValueError naming the argument.',
     "test": "tests/reliability/test_files.py::test_paths_that_escape_the_folder",
     "left": ""},
    {"category": "files",
     "found": 'adapter_config.json: duplicate keys accepted (last wins: "r": 4, "r": 8), NaN / Infinity / 1e999 '
              'accepted (init_scale=inf then raised RuntimeError inside add_adapter, not AdapterFileError), deeply '
              'nested JSON raised RecursionError, and the file was read whatever its size.',
     "fix": 'strict JSON reader (duplicate keys, NaN / Infinity refused, RecursionError -> AdapterFileError), 1 '
            'MiB cap; load_adapter removes the adapter again if copying its tensors fails.',
     "test": "tests/reliability/test_files.py::test_config_texts",
     "left": ""},
    {"category": "files",
     "found": "config fields of the wrong JSON type loaded silently: revision ['q', 'q'], base_model_name_or_path "
              '5, model_type 5, targets as an object, init_scale true.',
     "fix": "io.FIELD_TYPES: every field's JSON type checked in read_config; AdapterFileError names the file and "
            'the field.',
     "test": "tests/reliability/test_files.py::test_config_fields_fuzzed",
     "left": ""},
    {"category": "files",
     "found": 'a config edited (or bit-flipped) to another valid value that needs the same tensors (pooler last -> '
              'mean, activation gelu -> relu, pool_input) loaded the weights into another computation without a '
              'word.',
     "fix": "the weights' header carries config_sha256 (the fields that decide the computation); a mismatch "
            'raises AdapterFileError (files without it still load).',
     "test": "tests/reliability/test_files.py::test_config_edited_to_another_valid_value",
     "left": ""},
    {"category": "files",
     "found": "a save_pretrained that failed midway (a full disk in safetensors' writer or in the JSON write) left "
              'a half-written adapter_model.safetensors / adapter_config.json in place of the old files.',
     "fix": 'io._replace_all: each file written under a temporary name in its folder, then os.replace-d; '
            'temporaries removed on failure; a save that dies between the two renames leaves a pair refused by '
            'config_sha256.',
     "test": "tests/reliability/test_files.py::test_failed_save_leaves_old_files_intact",
     "left": ""},
    {"category": "files",
     "found": 'save_pretrained wrote through a symlink in the target folder, overwriting the file it pointed to '
              '(outside the folder).',
     "fix": 'os.replace of a temporary replaces the link itself.',
     "test": "tests/reliability/test_files.py::test_save_replaces_a_symlink_never_writes_through_it",
     "left": ""},
    # --- calls and numerics (test_calls.py, test_numerics.py)
    {"category": "files",
     "found": "found at scale 20 only: an adapter_config.json with a finite but huge init_scale (1e300) passed the "
              "config checks and failed inside the generator's initialisation with a RuntimeError ('from is out of "
              "bounds for float'), not an AdapterFileError",
     "fix": "config.py: init_scale must be at most MAX_INIT_SCALE = 1e4, so ±init_scale/sqrt(d) fits every float "
            "dtype; the file is refused naming the field",
     "test": "tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name",
     "left": ""},
    {"category": "calls",
     "found": 'PARAConfig: targets / layers_to_transform of a non-list type and a non-number '
              "init_scale raised Python's raw TypeError ('int' object is not iterable, '>' not "
              'supported) without naming the field; layers_to_transform=True or [True] was taken as '
              'layer 1; init_scale=inf was accepted (W_down infinite: NaN vectors); layers_path, '
              'base_model_name_or_path and revision of any type were accepted',
     "fix": "PARAConfig.__post_init__ checks each field's type (bools are not layer indices, "
            'init_scale finite) and raises ValueError naming it',
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "calls",
     "found": "PARAModel / get_para_model given a non-module model raised AttributeError ('NoneType' "
              "object has no attribute 'modules'); get_para_model(model, None) silently wrapped "
              "without an adapter; PARAConfig.from_dict('r') raised 'argument after ** must be a "
              "mapping'",
     "fix": 'TypeError naming model / config / from_dict before anything is hooked',
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "calls",
     "found": 'unknown adapter names (set_adapter, delete_adapter, adapter_names, '
              "add_weighted_adapter's adapters, save_pretrained's selected_adapters) gave 'unknown "
              "adapter ...' without the argument; a list or dict entry raised 'unhashable type' from "
              'the dict lookup',
     "fix": '_check_known names the argument (adapter_names: ... / selected_adapters: ...), TypeError'
            ' for a non-str name',
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "calls",
     "found": "set_adapter(inference_mode='yes') and load_adapter(is_trainable='yes') were taken as "
              "truthy; load_adapter checked adapter_name ('a/b', '__base__', 5) only after reading "
              'the files, so a bad name showed up as a file error; subfolder / revision / cache_dir '
              'of any type reached the path code',
     "fix": 'bool / str checks first; load_adapter and add_weighted_adapter validate the new name '
            "with add_adapter's rule (_check_new_name) before anything else",
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "calls",
     "found": "add_weighted_adapter: adapters='default' iterated its characters (unknown adapter "
              "'d'), weights=None / 1.0 / ['x'] raised raw TypeError / 'could not convert string to "
              "float', and NaN or Inf weights were accepted (an adapter with non-finite vectors)",
     "fix": 'adapters must be a list of names, weights a list of finite numbers, checked before the '
            'new adapter is added',
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "calls",
     "found": "save_pretrained: selected_adapters='default' iterated its characters, 5 raised 'int "
              "object is not iterable', [] silently wrote nothing; save_directory=None raised "
              "os.path's 'expected str, bytes or os.PathLike'",
     "fix": 'TypeError naming selected_adapters (a non-empty list) / save_directory, before any file '
            'is written',
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "calls",
     "found": "forward: prompt_lengths='ab' or [None, 1] raised torch's 'new(): invalid data type' / "
              "'Could not infer dtype'; completion_mask / assistant_masks of the wrong shape raised "
              "'labels must be [batch, seq_len]' (an argument the caller did not pass) or a raw size-"
              "mismatch RuntimeError; completion_mask='x' raised torch's TypeError; reprefill='yes' "
              '(forward and generate) was taken as True',
     "fix": "prompts._lengths and mask_as_labels (given the input's shape) name prompt_lengths / "
            "completion_mask / assistant_masks; reprefill must be a bool; all in the call's pre-hook,"
            ' before any layer runs',
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "calls",
     "found": "gradient_checkpointing_enable(gradient_checkpointing_kwargs='x') raised 'str object is"
              " not a mapping'",
     "fix": 'TypeError naming gradient_checkpointing_kwargs',
     "test": 'tests/reliability/test_calls.py::test_wrong_argument_is_refused_by_name', "left": ""},
    {"category": "numerics",
     "found": 'save_pretrained wrote an adapter whose weights had gone NaN / Inf (a diverged step) '
              'without a word: the file loads and every row routed to it gives NaN logits',
     "fix": 'save_pretrained checks every tensor of the selected adapters first and raises ValueError'
            ' naming the adapter and the tensor, writing nothing; allow_non_finite=True (docs/api.md)'
            ' saves it anyway',
     "test": "tests/reliability/test_numerics.py::test_diverged_adapter_is_not_saved", "left": ""},
    # --- long runs and concurrency (test_long_runs.py, test_concurrency.py)
    {"category": "long_runs",
     "found": "every prefill of a mixed batch re-stacked the banks of its adapters in every layer (torch.stack: a "
              "copy of those adapters' weights per layer per request; 150 us per layer for 8 adapters of a 7B "
              "model's size, ~5 ms per prefill over 32 layers)",
     "fix": "layer.py: PARAGenerator.bank caches the stacks (LRU of BANK_CACHE_SIZE per layer, kept off the "
            "module), checked at each use against every tensor's identity, _version and storage, so an optimizer "
            "step, an in-place edit, .data =, load / delete / add rebuild it; a forward that records autograd for "
            "the weights stacks afresh; delete_adapter drops the stacks holding the adapter",
     "test": "tests/reliability/test_long_runs.py::test_cached_bank_follows_every_weight_change", "left": ""},
    {"category": "concurrency",
     "found": "add_adapter of an adapter scaling a module no resident adapter scaled (e.g. target_modules with "
              "k_proj) while another thread's request was in its forward: that forward hit the new module's consumer "
              "with a scales list made before it existed and failed with IndexError (decode steps were covered by "
              "RequestState.fit, a forward already running was not)",
     "fix": "consumers.py: a module hooked after the running request began reads no scale (None: not scaled, "
            "which is what that request's adapters ask for); a zero-cost try on the per-token path",
     "test": "tests/reliability/test_concurrency.py::test_adapter_added_mid_request_leaves_it_alone",
     "left": ""},
    {"category": "concurrency",
     "found": "delete_adapter of an adapter while another thread's request using it was being prefilled failed that "
              "request with a bare KeyError from inside a layer hook",
     "fix": "layer.py: the layer raises RequestStateError naming the deleted adapter (the request has no vectors for "
            "it; the model serves on)",
     "test": "tests/reliability/test_concurrency.py::test_adapter_deleted_mid_prefill_raises_a_request_error",
     "left": ""},
    {"category": "concurrency",
     "found": "an adapter deleted by another thread after a call checked its adapter_names but before the prefill "
              "grouped its rows failed that call with a bare KeyError in requests.make_groups",
     "fix": "requests.py: the grouping raises RequestStateError naming the deleted adapter",
     "test": "tests/reliability/test_concurrency.py::"
             "test_adapter_deleted_after_the_names_were_checked_raises_a_request_error",
     "left": ""},
]
