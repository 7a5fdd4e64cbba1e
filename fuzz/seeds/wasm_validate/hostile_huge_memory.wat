;; Hostile: declares a minimum linear memory of 65536 pages (4 GiB), far past any function's
;; memory_mb. Instantiating it would reserve or commit the whole lot.
;; Expected: refused at deploy, 422 invalid_code, message mentions "memory limit".
(module
  (memory (export "memory") 65536)
  (func (export "_start")))
